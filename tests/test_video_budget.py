"""The decoding a video sampling takes: planned from the header and key frames (decode_cost),
counted as it happens (VideoInput.decoded_frames), refused over a limit before decoding, and
stopped at the limit when the frames are larger than the header says. Frames are counted; no
timings are asserted."""

from __future__ import annotations

import re
import struct

import av
import pytest
import torch
from media_helpers import read_frame_number, video_backends, write_growing_video, write_numbered_video

from internvl_chat.media import video as media_video, video_sampling, video_sources
from internvl_chat.media.video import BACKEND_ENV, decode_cost, load_video
from internvl_chat.media.video_cost import DecodeCost, DecodeOverBudget
from internvl_chat.media.video_sources import decord_work

CLIPS = {  # name: (frames, codec, options)
    "intra.avi": (40, "mpeg4", dict(gop=1)),  # PyAV, every frame a key frame: still decoded from the start
    "gop12.avi": (40, "mpeg4", dict(gop=12)),
    "gop12.mp4": (40, "mpeg4", dict(gop=12)),  # decord by default
    "one_key.mp4": (40, "mpeg4", dict(gop=1000)),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget")
    return {name: write_numbered_video(folder / name, n, 30, codec, **extra) for name, (n, codec, extra) in CLIPS.items()}


def test_decord_work_follows_its_seek_rule():
    """decord decodes from the key frame at or before a frame it seeks to, and on from where it
    is when the frame is further on in the same group (keys 0, 10, 20; 30 frames)."""
    keys = [0, 10, 20]
    assert decord_work([0], keys, 30) == [1]
    assert decord_work([3, 7], keys, 30) == [4, 4]  # same group: on from frame 4
    assert decord_work([3, 12, 15, 29], keys, 30) == [4, 3, 3, 10]  # 12: from key 10; 15: on from 13; 29: from key 20
    assert decord_work([10, 20], keys, 30) == [1, 1]  # a key frame is decoded alone
    assert decord_work([5, 25], [0], 30) == [6, 20]  # one key frame: on from the start
    assert decord_work([5], [], 30) == [6]


def test_each_frame_costs_at_least_a_128_pixel_square():
    """Decoding a frame has a fixed cost whatever its size: a million 16×16 frames are no cheap request."""
    assert DecodeCost(1_000_000, 16, 16, "pyav").pixels == 1_000_000 * 128 * 128
    shown = "1,000,000 frames of 16×16 (16,384 megapixels, each frame counted as 128×128)"
    assert str(DecodeCost(1_000_000, 16, 16, "pyav")) == shown
    assert str(DecodeCost(1874, 4096, 4096, "pyav")) == "1,874 frames of 4096×4096 (31,440.5 megapixels)"


@pytest.mark.parametrize("backend", video_backends())
def test_the_decoding_planned_is_the_decoding_done(clips, monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    for name, path in clips.items():
        if backend == "decord" and not name.endswith(".mp4"):
            continue  # decord seeks to other frames in AVI (see decord_is_exact)
        for num_frames in (1, 4, 8):
            cost = decode_cost(path, num_frames)
            result = load_video(path, num_frames, max_decode_pixels=cost.pixels)  # exactly the limit: allowed
            assert (cost.backend, cost.width, cost.height, cost.from_start) == (backend, 64, 48, backend == "pyav")
            assert (result.decoded_frames, result.decoded_pixels) == (cost.frames, cost.pixels), (name, num_frames)
            if backend == "pyav":  # from the start up to the last frame sampled
                assert cost.frames == max(result.indices) + 1, (name, num_frames)
            assert [read_frame_number(t) for t in result.pixel_values.numpy()] == result.indices


def test_decord_decodes_less_than_the_whole_clip_where_key_frames_allow(clips, monkeypatch):
    pytest.importorskip("decord")
    # 8 frames of 40 with a key frame every 12: from the key frame before each, not all from the start
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    assert decode_cost(clips["gop12.mp4"], 8).frames == 37  # the last one sampled is frame 36
    monkeypatch.setenv(BACKEND_ENV, "decord")
    assert decode_cost(clips["gop12.mp4"], 8).frames < 37


@pytest.mark.parametrize("backend", video_backends())
def test_a_plan_over_the_limit_is_refused_before_any_frame_is_decoded(clips, monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    decoded = []
    monkeypatch.setattr(media_video, "frame_to_tile", lambda *a: decoded.append(1))
    path = clips["one_key.mp4"]
    cost = decode_cost(path, 8)
    with pytest.raises(DecodeOverBudget) as err:
        load_video(path, 8, max_decode_pixels=cost.pixels - 1)
    assert err.value.cost == cost
    message = str(err.value)
    assert message == (f"video {path} needs {cost.frames} frames of 64×48 ({cost.pixels / 1e6:.6g} megapixels, each "
                       f"frame counted as 128×128) decoded to reach the frames sampled, over the limit of "
                       f"{(cost.pixels - 1) / 1e6:.6g} megapixels; cut the clip shorter or scale it down")  # fmt: skip
    assert decoded == []


def test_frames_larger_than_the_header_says_stop_the_decode_at_the_limit(tmp_path, monkeypatch):
    """The header tells of 64×48 frames; the stream grows to 512×512 after 10: the plan fits the
    limit, the decoding does not, and it stops at the frame that passes it."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_growing_video(tmp_path / "growing.ts", small=10, large=20)
    cost = decode_cost(path, 4)
    assert (cost.backend, cost.width, cost.height) == ("pyav", 64, 48) and cost.pixels < 500_000
    unbounded = load_video(path, 4)
    assert unbounded.decoded_pixels > 1_000_000  # what the limit below would allow
    with pytest.raises(DecodeOverBudget) as err:
        load_video(path, 4, max_decode_pixels=1_000_000)
    # about 10 frames of 64×48 (each counted as 128×128), then the 4th of 512×512 passes 1,000,000 pixels
    message = str(err.value)
    after = re.fullmatch(rf"decoding video {re.escape(str(path))} passed the limit of 1 megapixels after (\d+) frames "
                         r"\(its frames are larger than its header says\); cut the clip shorter or scale it down", message)
    assert after and 12 <= int(after.group(1)) <= 14, message


# ---------------------------------------------------------------- intra-only streams

INTRA_CLIPS = {"mjpeg.avi": ("mjpeg", "yuvj420p"), "raw.avi": ("rawvideo", "yuv420p")}


def _promising(path, frames: int):
    """A copy of an AVI whose header promises `frames` frames (strh dwLength, avih dwTotalFrames)."""
    data = bytearray(path.read_bytes())
    for chunk, offset in ((b"strh", 32), (b"avih", 16)):
        at = data.index(chunk) + 8 + offset
        data[at : at + 4] = struct.pack("<I", frames)
    copy = path.with_name("promising_" + path.name)
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("name", list(INTRA_CLIPS))
def test_intra_only_streams_decode_only_the_sampled_frames_and_give_those_of_a_full_decode(tmp_path, monkeypatch, name):
    """MJPEG or raw frames keep nothing from one frame to the next: each sampled frame is decoded
    alone, and equals, bit for bit, the frame of that number in a decode of the whole stream."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    codec, pix_fmt = INTRA_CLIPS[name]
    path = write_numbered_video(tmp_path / name, 40, 30, codec, pix_fmt=pix_fmt)
    with av.open(str(path)) as container:
        full = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(full) == 40
    for num_frames, start, end in [(8, None, None), (5, 0.3, 1.2), (1, None, None), (64, None, None)]:
        result = load_video(path, num_frames, start, end)
        assert result.backend == "pyav" and result.decoded_frames == len(set(result.indices))
        cost = decode_cost(path, num_frames, start, end)
        assert cost.frames == len(set(result.indices)) and not cost.from_start
        assert [read_frame_number(t) for t in result.pixel_values.numpy()] == result.indices
        for tile, number in zip(result.pixel_values, result.indices):
            assert torch.equal(tile, media_video.frame_to_tile(full[number], None, 448)[0]), (name, number)
    # a header that promises 60 frames: the 40 there are sampled again (the first try decoded the 4
    # it wanted below 40 and the last one, 39; none is among the second's 6); an AVI's count also
    # counts the frames its capture dropped (stored as empty chunks), so no note says it is cut short
    result = load_video(_promising(path, 60), 6)
    assert video_sampling.frame_indices(60, 30.0, 6)[-2:] == [43, 53]  # past the end
    assert result.indices == video_sampling.frame_indices(40, 30.0, 6) == [3, 9, 16, 23, 29, 35]
    assert (result.num_total_frames, result.listed_frames, result.decoded_frames) == (40, None, 4 + 1 + 6)
    assert [read_frame_number(t) for t in result.pixel_values.numpy()] == result.indices


def test_streams_of_key_frames_of_a_codec_that_is_not_intra_only_are_still_decoded_from_the_start(clips, monkeypatch):
    """MPEG-4 may refer to earlier frames whatever the key frame flags say: no skipping there."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    assert decode_cost(clips["intra.avi"], 8).frames == load_video(clips["intra.avi"], 8).decoded_frames == 37


def test_what_decord_decoded_before_it_failed_counts_against_the_limit(clips, monkeypatch):
    """decord failing midway hands the file to PyAV, which must fit in what is left."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = clips["gop12.mp4"]
    decord_cost = decode_cost(path, 8)
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    pyav_cost = decode_cost(path, 8)
    monkeypatch.delenv(BACKEND_ENV)
    assert decord_cost.backend == "decord"

    def fail_after_the_plan(self, wanted, stop, meter):
        meter.charge(self.plan(wanted), *self.size)  # as if it had decoded them all
        raise video_sources.DecordFailed("decord gave up")
        yield  # a generator, as the real one

    monkeypatch.setattr(video_sources.DecordSource, "frames", fail_after_the_plan)
    both = decord_cost.pixels + pyav_cost.pixels
    assert load_video(path, 8, max_decode_pixels=both).decoded_pixels == both
    with pytest.raises(DecodeOverBudget) as err:
        load_video(path, 8, max_decode_pixels=both - 1)
    assert f"({decord_cost.pixels / 1e6:.6g} of them spent already by an earlier pass over the file)" in str(err.value)


def test_an_intra_only_stream_whose_packets_are_not_one_frame_each_is_decoded_from_the_start(tmp_path, monkeypatch):
    """MJPEG fields may come in packets of their own (a packet that gives no picture): packet n is
    not frame n there, so, found out at a wanted packet, the stream is decoded again from the start."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_numbered_video(tmp_path / "mjpeg.avi", 40, 30, "mjpeg", pix_fmt="yuvj420p")
    alone = video_sources.PyAVSource._alone
    calls = []

    def third_gives_none(self, packet):
        calls.append(1)
        if len(calls) == 3:
            raise video_sources.NotOnePerPacket
        return alone(self, packet)

    monkeypatch.setattr(video_sources.PyAVSource, "_alone", third_gives_none)
    result = load_video(path, 8)
    assert [read_frame_number(t) for t in result.pixel_values.numpy()] == result.indices
    assert result.decoded_frames == 2 + max(result.indices) + 1  # two alone, then all from the start
