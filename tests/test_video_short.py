"""Videos whose stream ends before the count their header lists: an MP4 cut short whose index sits
before the frames (as streaming sites write them: the index survives the cut and lists every
frame; it also tells where each frame lies, so the cut is found before any decoding), one whose
index was lost with its end, one damaged inside, and one whose edit list hides its first frames.
The frames sent are the ones a player shows, never a stand-in."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import av
import pytest
from PIL import Image
from media_helpers import (
    VIDEO_SIZE,
    cut_at_frame,
    faststart_copy,
    numbered_frame,
    read_frame_number,
    remux_video,
    video_backends,
    with_edits,
    with_empty_edit,
    write_late_start_video,
    write_numbered_video,
    write_trimmed_video,
)

from internvl_chat.errors import MediaError
from internvl_chat.media import video_header, video_sources
from internvl_chat.media.video import BACKEND_ENV, VideoLength, load_video, measure_video, probe_video
from internvl_chat.media.video_cost import DecodeOverBudget, frame_work
from internvl_chat.media.video_header import VideoHeader, count_packets, frames_lost, read_header
from internvl_chat.media.video_sampling import frame_indices
from internvl_chat.media.video import VideoInput

FRAMES, FPS = 60, 10


def _whole(folder, codec: str = "mpeg4", pix_fmt: str = "yuv420p", suffix: str = ".mp4"):
    made = write_numbered_video(folder / f"made{suffix}", FRAMES, FPS, codec, pix_fmt=pix_fmt)
    path = faststart_copy(made, folder / f"whole{suffix}")
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # the index first
    return path


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _whole(tmp_path_factory.mktemp("short"))


@pytest.fixture(scope="module")
def whole_mjpeg(tmp_path_factory):
    """Each packet a whole picture: PyAV decodes only the sampled packets, and the last one."""
    return _whole(tmp_path_factory.mktemp("short_mjpeg"), "mjpeg", "yuvj420p", ".mov")


def _cut(whole, tmp_path, frame: int, inside: bool = False):
    return cut_at_frame(whole, tmp_path / f"cut{whole.suffix}", frame, inside)


def _frames_in(path) -> int:
    """The frames a plain decode gives before it ends or fails (at a packet cut with the file)."""
    count = 0
    with av.open(str(path)) as container:
        try:
            for _ in container.decode(video=0):
                count += 1
        except av.error.InvalidDataError:
            pass
    return count


def _shown(result: VideoInput) -> list[int]:
    return [read_frame_number(tile) for tile in result.pixel_values.numpy()]


def _note(path, held: int, listed: int = FRAMES) -> str:
    return (f"{path} holds only {held} of the {listed} frames its header lists ({held / FPS:.1f} s of {listed / FPS:.1f} s): "
            f"the file may be cut short (an unfinished download or copy); its frames were sampled from those {held}")


@pytest.fixture
def without_index(monkeypatch):
    """As with a PyAV that does not show FFmpeg's index (stream.index_entries): the cut is found
    only while decoding, as the stream ends."""
    monkeypatch.setattr(video_header, "frames_lost", lambda stream, path, hides: 0)


@pytest.mark.parametrize("frame, inside", [(14, False), (50, True)])  # inside: the last packet is cut too
@pytest.mark.parametrize("clip", ["whole", "whole_mjpeg"])
def test_a_cut_file_is_measured_and_sampled_from_the_frames_it_holds_and_says_so(request, tmp_path, monkeypatch, frame, inside,
                                                                                   clip):  # fmt: skip
    """The index places the samples of frames `frame`… past the end of the file: the length, the
    sampling and the note count the frames before it, whole (a decoder may conceal what a half
    packet lacks, and made one more frame of it). Before, the sampled frames past the cut all
    repeated the last one decoded (half a 60-frame clip: frames 3, 10, 13, 13, 13, …), then were
    sampled again once decoding found the end; the length said at attach was the header's."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = request.getfixturevalue(clip)
    path = _cut(whole, tmp_path, frame, inside)
    assert read_header(path, orientation=False).frames == FRAMES  # the header still lists them all
    assert measure_video(path) == VideoLength(frame, FPS, frame / FPS, FRAMES)
    assert probe_video(path) == (frame, FPS, frame / FPS)
    result = load_video(path, 8)
    assert (result.num_total_frames, result.listed_frames) == (frame, FRAMES)
    assert result.indices == frame_indices(frame, FPS, 8) == _shown(result)
    assert len(set(result.indices)) == 8  # eight different frames, none standing in for another
    assert result.timestamps == pytest.approx([i / FPS for i in result.indices])
    assert result.shortfall_note == _note(path, frame)


@pytest.mark.parametrize("frame, inside", [(14, False), (50, True)])
@pytest.mark.parametrize("clip", ["whole", "whole_mjpeg"])
def test_without_the_index_a_cut_file_is_sampled_again_once_decoding_finds_its_end(request, tmp_path, monkeypatch, frame,
                                                                                   inside, clip, without_index):  # fmt: skip
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = request.getfixturevalue(clip)
    path = _cut(whole, tmp_path, frame, inside)
    held = _frames_in(path)
    assert held == frame or (inside and held == frame + 1)  # a decoder may conceal what a half packet lacks
    assert probe_video(path)[0] == FRAMES  # the header's count, all it can tell
    result = load_video(path, 8)
    assert (result.num_total_frames, result.listed_frames) == (held, FRAMES)
    assert result.indices == frame_indices(held, FPS, 8) == _shown(result)
    assert len(set(result.indices)) == 8
    assert result.shortfall_note == _note(path, held)


def test_a_cut_that_no_sampled_frame_reaches_is_found_and_said(tmp_path, monkeypatch):
    """The last 3 of 40 frames lost, 8 sampled: the frames the header's 40 sample (…, 31, 36) all
    lie before the cut, so decoding never reached it: the frames were spread over 4.0 s the file
    does not hold, with no note. Now they are sampled from the 37 it holds, in one pass."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    made = write_numbered_video(tmp_path / "made.mp4", 40, FPS)
    path = cut_at_frame(faststart_copy(made, tmp_path / "whole.mp4"), tmp_path / "cut.mp4", 37)
    assert frame_indices(40, FPS, 8)[-1] < 37
    assert measure_video(path) == VideoLength(37, FPS, 3.7, 40)
    result = load_video(path, 8)
    assert result.indices == frame_indices(37, FPS, 8) == _shown(result)
    assert result.decoded_frames == result.indices[-1] + 1  # one pass
    assert result.shortfall_note == _note(path, 37, 40)


def test_the_whole_file_measures_as_its_header_says(whole, tmp_path):
    assert read_header(whole, orientation=False).lost == 0
    assert measure_video(whole) == VideoLength(FRAMES, FPS, 6.0, None)
    made = tmp_path / "index_last.mp4"
    made.write_bytes((whole.parent / "made.mp4").read_bytes())
    assert measure_video(made) == VideoLength(FRAMES, FPS, 6.0, None)


def test_the_last_frame_alone_lost_is_measured_without_a_note(whole, tmp_path, monkeypatch):
    """One frame fewer than the header may be its rounding (a count from the duration): the frames
    held are sampled, and nothing is said."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    path = _cut(whole, tmp_path, FRAMES - 1)
    assert measure_video(path) == VideoLength(FRAMES - 1, FPS, (FRAMES - 1) / FPS, None)
    result = load_video(path, 8)
    assert result.indices == frame_indices(FRAMES - 1, FPS, 8) == _shown(result)
    assert (result.num_total_frames, result.listed_frames, result.shortfall_note) == (FRAMES - 1, None, None)


def _refused_at_attach_and_send(path: Path, message: str) -> None:
    """Both the attach (probe_video) and the send (load_video) refuse `path` with exactly `message`."""
    for call in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            call(path)
        assert str(err.value) == message


def test_a_file_cut_before_its_first_frame_is_refused_in_one_line(whole, tmp_path):
    path = _cut(whole, tmp_path, 0)
    _refused_at_attach_and_send(path, f"{path} holds none of the {FRAMES} frames its header lists: the file is cut "
                                      "short (an unfinished download or copy); use a complete copy")  # fmt: skip


def test_an_mp4_whose_index_at_the_end_was_cut_off_is_refused_in_one_line(whole, tmp_path):
    """Written without faststart, an MP4 keeps its index (moov) after the frames: cut short, it has
    none, and FFmpeg reads nothing. Before: "… (Invalid data found when processing input); use an
    MP4, MKV, WebM or AVI file" — for an MP4."""
    data = (whole.parent / "made.mp4").read_bytes()
    assert data.index(b"mdat") < data.index(b"moov")
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: data.index(b"moov") - 200])
    _refused_at_attach_and_send(path, f"{path} has no index (an MP4 or MOV without its moov box): the file is cut "
                                      "short (an unfinished download, copy or recording); use a complete copy")  # fmt: skip


@pytest.mark.parametrize("layout", ["faststart", "index last"])
@pytest.mark.parametrize("inside", [b"moov", b"trak", b"stsd", b"stts", b"stsz"])
def test_an_mp4_cut_inside_its_index_is_refused_as_cut_short(whole, tmp_path, layout, inside):
    """A download cut inside the index (moov) of an MP4 that keeps it before its frames holds no
    frame; one that keeps it after them, cut inside its sample tables, has none FFmpeg can place.
    Before: "has no video stream; pass a video file", "stores its video in a codec FFmpeg cannot
    decode; re-encode it as an H.264 MP4", "cannot read video … (End of file); use an MP4, …", or
    measured whole at attach and refused at send as "decoded to no frames"."""
    data = (whole if layout == "faststart" else whole.parent / "made.mp4").read_bytes()
    moov = data.index(b"moov") - 4
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: data.index(inside, moov) + 12])  # a few bytes into that box
    _refused_at_attach_and_send(path, f"{path} ends before its index (the moov box of an MP4 or MOV) is whole: the "
                                      "file is cut short (an unfinished download, copy or recording); use a complete copy")  # fmt: skip


def test_a_cut_file_whose_edit_list_hides_frames_counts_the_frames_shown(tmp_path, monkeypatch):
    """Frames 0…4 hidden, the file cut where stored frame 40 begins: it shows frames 5…39, 35 of the 55."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    trimmed = faststart_copy(write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5), tmp_path / "fast.mp4")
    path = cut_at_frame(trimmed, tmp_path / "cut.mp4", 40)
    assert measure_video(path) == VideoLength(35, FPS, 3.5, 55)
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames, result.listed_frames) == ("pyav", 35, 55)
    assert result.indices == frame_indices(35, FPS, 8)
    assert _shown(result) == [i + 5 for i in result.indices]


def _entry(pos, size=10, discard=False):
    return SimpleNamespace(pos=pos, size=size, is_discard=discard)


@pytest.mark.parametrize("entries, hides, lost", [
    ([_entry(0), _entry(10), _entry(20)], False, 0),  # all within the 30 bytes
    ([_entry(0), _entry(10), _entry(25)], False, 1),  # the last one half
    ([_entry(0), _entry(40), _entry(50)], False, 2),
    ([_entry(100), _entry(110), _entry(120)], False, 3),  # read_header then refuses the file
    ([_entry(0), _entry(10), _entry(-1)], False, 0),  # an unknown position tells nothing
    ([_entry(0), _entry(None), _entry(50)], False, 1),
    ([_entry(0), _entry(10), _entry("50")], False, 0),
    ([_entry(0), _entry(2**62), _entry(2**63)], False, 2),  # far past the end
    ([_entry(0), _entry(10, size=-5), _entry(20, size=None)], False, 0),
    ([_entry(0), _entry(40), _entry(50, discard=True)], True, 1),  # an edit list hides the last
    ([_entry(0), _entry(40), _entry(50, discard=True)], False, 2),  # not looked for where none is hidden
    ([], False, 0),
])  # fmt: skip
def test_frames_lost_reads_odd_index_entries_without_failing(tmp_path, entries, hides, lost):
    path = tmp_path / "thirty"
    path.write_bytes(bytes(30))
    assert frames_lost(SimpleNamespace(index_entries=entries), path, hides) == lost


def test_frames_lost_tells_nothing_without_an_index_or_a_file(tmp_path):
    path = tmp_path / "thirty"
    path.write_bytes(bytes(30))
    assert frames_lost(SimpleNamespace(), path, False) == 0  # a PyAV without index_entries
    assert frames_lost(SimpleNamespace(index_entries=[_entry(40)]), tmp_path / "gone", False) == 0


@pytest.mark.parametrize("backend", video_backends())
def test_either_backend_refuses_or_gives_the_frames_the_file_holds(whole, tmp_path, monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = _cut(whole, tmp_path, 30)
    held = _frames_in(path)
    try:
        result = load_video(path, 8)
    except MediaError as e:  # forced decord cannot read the file: a one-line refusal
        assert backend == "decord" and "\n" not in str(e) and str(path) in str(e)
        return
    assert result.indices == frame_indices(held, FPS, 8) == _shown(result)


def test_the_whole_file_has_no_note(whole, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    result = load_video(whole, 8)
    assert result.listed_frames is None and result.shortfall_note is None
    assert result.indices == frame_indices(FRAMES, FPS, 8) == _shown(result)


def test_frames_decoded_before_the_end_was_found_are_kept_when_sampled_again(whole, tmp_path, monkeypatch, without_index):
    """Both passes decode from the start; the second only as far as its last missing frame."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    path = _cut(whole, tmp_path, 30)
    held = _frames_in(path)
    result = load_video(path, 2)
    assert result.indices == frame_indices(held, FPS, 2)
    assert result.decoded_frames == held + result.indices[-1] + 1


def test_a_time_range_past_the_frames_held_is_refused_with_their_length(whole, tmp_path, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    path = _cut(whole, tmp_path, 30)
    held = _frames_in(path)
    with pytest.raises(MediaError, match=rf"start 5\.0 s is at or past the end of the video \({held / FPS:.2f} s\)"):
        load_video(path, 4, start=5.0)
    result = load_video(path, 4, start=0.5, end=5.0)  # an end past it: its last frame
    assert result.indices == frame_indices(held, FPS, 4, 0.5, 5.0) == _shown(result)
    assert result.indices[-1] < held


def test_the_second_pass_counts_against_the_decoding_limit(whole, tmp_path, monkeypatch, without_index):
    """The first pass is planned from the header (frames 0…55) and decodes the 52 or so there are,
    the second decodes frames 0…46 or so again: together more than the plan."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    path = _cut(whole, tmp_path, 52, inside=True)
    held = _frames_in(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        each = frame_work(stream.codec_context.width, stream.codec_context.height)
    second = frame_indices(held, FPS, 8)[-1] + 1
    assert held + second > frame_indices(FRAMES, FPS, 8)[-1] + 1
    load_video(path, 8, max_decode_pixels=(held + second) * each)  # both passes fit
    with pytest.raises(DecodeOverBudget, match=r"spent already by an earlier pass over the file"):
        load_video(path, 8, max_decode_pixels=(held + second - 1) * each)


def test_a_file_damaged_inside_is_refused_where_its_decoding_fails(whole, tmp_path, monkeypatch):
    """Frames past the damage are garbage the decoder rejects: neither a stand-in nor a resampling."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    data = whole.read_bytes()
    start = data.index(b"mdat") + 4 + 400  # the first frames whole, the rest overwritten
    path = tmp_path / "damaged.mp4"
    path.write_bytes(data[:start] + bytes(range(256)) * ((len(data) - start) // 256 + 1))
    assert count_packets(path) == FRAMES  # every frame is there, as bytes
    with pytest.raises(MediaError) as err:
        load_video(path, 8)
    message = str(err.value)
    assert message.startswith(f"cannot decode {path} past frame ")
    assert f" of {FRAMES}, at " in message and message.endswith(
        "; the file is damaged there: cut the clip before that point (a time range does), or use an undamaged copy")
    assert "\n" not in message


def test_frames_an_edit_list_hides_are_not_sampled_nor_noted(tmp_path, monkeypatch):
    """A clip cut without re-encoding stores frames before its start, hidden by an edit list: its
    header counts them (60), its duration does not (5.5 s). The frames sampled are those a player
    shows (5…59 of the stored ones), by PyAV: decord counts and seeks the stored frames, and came
    back with frames 8, 15, 18, 25, … for 3, 10, 17, 23, … probe_video counts those shown too (it
    gave the header's 60, not the 55 load_video samples from)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5)
    header = read_header(path, orientation=False)
    assert (header.frames, header.duration, header.frames_shown) == (FRAMES, 5.5, 55)
    assert probe_video(path) == (55, FPS, 5.5)
    assert _frames_in(path) == 55
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames, result.listed_frames) == ("pyav", 55, None)
    assert result.indices == frame_indices(55, FPS, 8)
    assert _shown(result) == [i + 5 for i in result.indices]
    assert result.decoded_frames == result.indices[-1] + 1  # one pass: the count came from the duration


@pytest.mark.parametrize("edits, version", [
    ([(0, 0)], 0),  # an edit that lasts 0: a muxer that never filled it in
    ([(0, 0)], 1),
    ([(0, 512)], 0),  # from the 6th stored frame (the trimmed clip's hidden ones), lasting 0
    ([(10_000, -1), (0, 0)], 0),  # an empty edit (a delay), then one lasting 0
    ([(6_000, 10**6)], 0),  # past the end of the media
    ([(6_000, -1)], 0),  # an empty edit alone
])  # fmt: skip
@pytest.mark.parametrize("backend", [None, *video_backends()])
def test_an_mp4_whose_edits_show_no_frame_is_measured_and_sampled_from_all_its_samples(tmp_path, monkeypatch, edits, version,
                                                                                        backend):  # fmt: skip
    """An edit list whose edits of the media all last 0 (or start past its end, or are all empty):
    FFmpeg showed one frame at most, so the attach line said 60 frames, 6 s, and sending it failed
    ("decoded to no frames"), or forced decord read one frame. A player that plays it shows all 60
    samples, as FFmpeg does without the edit list: they are measured and sampled, by PyAV (decord
    reads the edit list)."""
    if backend is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, backend)
    path = with_edits(write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5), tmp_path / "edits.mp4", edits, version)
    assert measure_video(path) == VideoLength(FRAMES, FPS, 6.0)
    if backend == "decord":
        with pytest.raises(MediaError, match=f"^decord cannot .* unset {BACKEND_ENV} .* set it to pyav"):
            load_video(path, 8)
        return
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames, result.listed_frames, result.shortfall_note) == ("pyav", FRAMES, None, None)
    assert result.indices == frame_indices(FRAMES, FPS, 8)
    assert _shown(result) == result.indices  # the stored frames, the hidden ones included


def test_edits_that_show_no_frame_are_told_from_edits_that_show_some(tmp_path):
    trimmed = write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5)
    for edits, nothing in [([(0, 0)], True), ([(6_000, 10**6)], True), ([(6_000, -1)], True), ([(0, 0), (5_000, 0)], False),
                           ([], False), ([(5_000, 512)], False), ([(6_000, -1), (5_000, 0)], False)]:  # fmt: skip
        path = with_edits(trimmed, tmp_path / "edits.mp4", edits)
        with av.open(str(path)) as container:
            assert video_header.edits_show_nothing(container.streams.video[0]) is nothing, edits
    assert not video_header.edits_show_nothing(SimpleNamespace())  # a PyAV without index_entries


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_an_mp4_of_thousands_of_edits_is_not_read_by_decord(tmp_path, monkeypatch, backend):
    """2,000 edits of 10 ms each: FFmpeg's index lists a key frame and those after it again for
    each (23,281 entries for 60 frames). decord counts each entry a frame and took minutes to
    open and seek the 27 KB file (100 s for 5,000 edits); it is read by PyAV."""
    if backend is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, backend)
    trimmed = write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5)
    path = with_edits(trimmed, tmp_path / "edits.mp4", [(10, number * 100) for number in range(2_000)])
    header = read_header(path, orientation=False)
    assert header.frames == FRAMES and header.index_length > 10 * FRAMES
    assert not video_sources.decord_is_exact(header)
    assert measure_video(path).frames == FRAMES
    assert load_video(path, 4).backend == "pyav"


def _fragmented_video(tmp_path, monkeypatch, backend: str | None, movflags: str):
    """30 numbered frames remuxed into a fragmented MP4 (a fragment per 5-frame GOP) with
    `movflags`, read with `backend` (None: the app's default choice)."""
    if backend is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_numbered_video(tmp_path / "fragments.mp4", 30, FPS, gop=5)
    fragmented = tmp_path / "fragmented.mp4"
    with av.open(str(path)) as source, av.open(str(fragmented), "w", options={"movflags": movflags}) as target:
        out = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = out
                target.mux(packet)
    return fragmented


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_a_fragmented_mp4_whose_moov_counts_its_first_fragment_is_measured_and_sampled_whole(tmp_path, monkeypatch, backend):
    """Its moov counts the first fragment's 5 samples, its moof boxes the other 25: FFmpeg's count
    is the moov's, so the attach line said 5 frames of 3.0 s and PyAV sampled frames 0…4 alone
    (decord, which counts FFmpeg's index, all 30). The index lists all 30 as FFmpeg opens it."""
    fragmented = _fragmented_video(tmp_path, monkeypatch, backend, "frag_keyframe")
    with av.open(str(fragmented)) as container:
        assert container.streams.video[0].frames == 5  # the moov's
    header = read_header(fragmented, orientation=False)
    assert (header.frames, header.index_length) == (30, 30)
    assert video_sources.decord_is_exact(header)
    assert measure_video(fragmented) == VideoLength(30, FPS, 3.0)
    result = load_video(fragmented, 8)
    assert result.num_total_frames == 30 and result.indices == frame_indices(30, FPS, 8) == _shown(result)


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_a_fragmented_mp4_of_an_empty_moov_cut_short_is_measured_as_it_is_sampled(tmp_path, monkeypatch, backend):
    """Its moov counts no sample (movflags frag_keyframe+empty_moov, as a recorder that survives a
    crash writes it), its moof boxes all 30. Cut inside its 4th fragment's frames: FFmpeg's index
    lists the 4th's too, its count is 0, so the attach line said 17 frames (the duration at the
    rate) and the frames after the cut were never told lost: decoding sampled the 12 held, no note.
    It is counted from the index as a moov that lists some is, its lost frames told at attach."""
    import struct

    fragmented = _fragmented_video(tmp_path, monkeypatch, backend, "frag_keyframe+empty_moov")
    data = fragmented.read_bytes()
    at, mdats = 0, []
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"mdat":
            mdats.append((at, size))
        at += size
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: mdats[3][0] + mdats[3][1] // 2])
    length = measure_video(cut)
    assert length.listed_frames is not None and 0 < length.frames < length.listed_frames < 30, length
    result = load_video(cut, 8)
    assert result.num_total_frames == length.frames and result.indices == frame_indices(length.frames, FPS, 8) == _shown(result)
    assert result.shortfall_note is not None and f"holds only {length.frames} of the {length.listed_frames} frames" in result.shortfall_note
    assert measure_video(fragmented) == VideoLength(30, FPS, 3.0)


def test_an_avi_whose_capture_dropped_frames_is_sampled_from_its_frames_without_a_note(tmp_path, monkeypatch):
    """AVI counts the frames a capture dropped (the muxer writes nothing for them): 26 counted, 20
    stored. They are sampled from the 20, and no note calls the file cut short."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = tmp_path / "drops.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuvj420p"
        pts = 0
        for number in range(20):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts = pts
            container.mux(stream.encode(frame))
            pts += 2 if number % 3 == 1 else 1  # a frame dropped after frames 1, 4, 7, 10, 13, 16
        container.mux(stream.encode())
    assert probe_video(path)[0] == 26 and _frames_in(path) == 20
    result = load_video(path, 8)
    assert (result.num_total_frames, result.listed_frames, result.shortfall_note) == (20, None, None)
    assert result.indices == frame_indices(20, FPS, 8) == _shown(result)


def test_an_avi_cut_short_is_sampled_to_its_last_frame_held(tmp_path, monkeypatch):
    """An AVI keeps its count at the start and its index at the end: cut short, it lists 60 frames
    and FFmpeg guesses its duration from its size (5.3 s for the 58 frames held). The count stands:
    the guess hid frames 53…57, and refused a start at 5.5 s as past the end. (A range to the end:
    the first pass reaches past the cut, as sampling the whole clip here does not.)"""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    path = _cut(whole, tmp_path, 58)
    held = _frames_in(path)
    assert held == 58 and read_header(path, orientation=False).frames == FRAMES
    for start in (5.0, 5.5):
        result = load_video(path, 8, start=start)
        assert result.indices == frame_indices(held, FPS, 8, start) == _shown(result)
        assert result.num_total_frames == held  # not the count's: an AVI's may count drops
        assert result.shortfall_note == _ends_note(path, held, 6.0)  # its movi list is cut: the 2 frames lost are told


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV without libx264")
@pytest.mark.parametrize("frame", [5, 13])  # after a B-frame: the frames held are frames 0…frame-1
def test_an_h264_cut_inside_a_frame_gives_every_frame_it_holds_whole(tmp_path, monkeypatch, frame):
    """H.264 with B-frames decodes in frame threads, which hold frames back: the half packet at the
    cut failed at the end, and took the frames held back with it (11 of the 13 frames the attach
    line counted were sent, 3 of 5; a file holding 2 was refused as decoding to none). The samples the
    index places wholly within the file are decoded; the half one is not given to the decoder."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    monkeypatch.setattr(video_sources.os, "cpu_count", lambda: 4)  # frame threads, as on any machine of several cores
    options = {"bf": "3", "g": "12", "x264-params": "b-adapt=0:scenecut=0"}  # I0 P4 B1 B2 B3 P8 B5 …
    made = write_numbered_video(tmp_path / "made.mp4", 30, FPS, "libx264", options=options)
    path = cut_at_frame(faststart_copy(made, tmp_path / "whole.mp4"), tmp_path / "cut.mp4", frame, inside=True)
    assert measure_video(path) == VideoLength(frame, FPS, frame / FPS, 30)
    result = load_video(path, 30)
    assert result.num_total_frames == frame
    assert result.indices == frame_indices(frame, FPS, 30) == _shown(result)
    assert result.indices[-1] == frame - 1  # the last frame held is among them


def _with_audio(path, frames: int):
    """An MP4 of numbered frames with an audio track: the muxer interleaves them, so the video's
    first samples sit in chunks of their own, each placed by its own offset."""
    import numpy as np

    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width, video.height = VIDEO_SIZE
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        audio.layout = "mono"
        for number in range(frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")))
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 8000, number * 800
            container.mux(audio.encode(sound))
        container.mux(video.encode())
        container.mux(audio.encode())
    return path


def test_a_sample_declared_far_larger_than_the_file_is_damage_not_lack_of_memory(tmp_path, monkeypatch):
    """FFmpeg answers a sample the index declares 1 GiB long (in a file of a few KiB) with ENOMEM
    as it reads it: load_video raised that MemoryError, which the app takes for running out of
    memory ('out of memory reading the attachments; attach fewer or smaller pictures …')."""
    import struct

    monkeypatch.setenv(BACKEND_ENV, "pyav")
    data = bytearray(_with_audio(tmp_path / "made.mp4", 20).read_bytes())
    sizes = data.index(b"stsz")  # the video's: its track comes first
    assert struct.unpack(">II", data[sizes + 8 : sizes + 16]) == (0, 20)  # one size per sample follows
    struct.pack_into(">I", data, sizes + 16 + 4 * 2, 0x3FFFFFFF)  # sample 2
    path = tmp_path / "hostile.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=r"past frame \d+ of 20, .*; the file is damaged there") as err:  # (Cannot allocate memory)
        load_video(path, 8)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV without libx264")
def test_a_b_frame_stream_cut_short_counts_the_frames_shown_before_the_first_it_lacks(tmp_path, monkeypatch):
    """Samples are stored in decode order: cut short, a file may hold a P-frame shown after a B-frame
    it lacks (frames 0…12 and 16, say). Frame 16 was counted as frame 13, and sampled as such: a
    stand-in for a frame the file does not hold, with the time of another. The sample tables' times
    put the frames held in the order they are shown: 13 frames."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    options = {"bf": "3", "g": "12", "x264-params": "b-adapt=0:scenecut=0"}
    made = write_numbered_video(tmp_path / "made.mp4", 30, FPS, "libx264", options=options)
    whole = faststart_copy(made, tmp_path / "whole.mp4")
    with av.open(str(whole)) as container:
        shown = [packet.pts for packet in container.demux(video=0) if packet.size]  # in decode order
    # the first cut that leaves a frame held shown after one lost, and the frames shown before that one
    cut = next(k for k in range(10, 30) if max(shown[:k]) > min(shown[k:]))
    before = sum(t < min(shown[cut:]) for t in shown[:cut])
    assert before < cut
    path = cut_at_frame(whole, tmp_path / "cut.mp4", cut)
    assert measure_video(path) == VideoLength(before, FPS, before / FPS, 30)
    result = load_video(path, 30)
    assert result.num_total_frames == before
    assert result.indices == frame_indices(before, FPS, 30) == _shown(result)
    assert result.indices[-1] == before - 1


# ---------------------------------------------------------------- MKV, WebM, AVI cut short

# containers whose frame count is not to be trusted: MKV and WebM store none (it is estimated from
# the duration they keep at the start), an AVI's counts the frames its capture dropped
UNTRUSTED_COUNTS = {
    "mpeg4.mkv": ("mpeg4", {}),
    "h264.mkv": ("libx264", dict(options={"bf": "3", "g": "12"})),  # B-frames: decode order is not the order shown
    "vp9.webm": ("libvpx-vp9", {}),
    "mpeg4.avi": ("mpeg4", {}),
}


def _untrusted(name: str, folder, frames: int = 30, fps: float = FPS):
    codec, extra = UNTRUSTED_COUNTS[name]
    if codec != "mpeg4" and codec not in av.codecs_available:
        pytest.skip(f"PyAV without {codec}")
    return write_numbered_video(folder / name, frames, fps, codec, **extra)


def _ends_note(path, held: int, listed_s: float) -> str:
    with av.open(str(path)) as container:  # B-frames: the latest frame shown may come after some the cut took
        end = max(float(p.pts * p.time_base) for p in container.demux(video=0) if p.size) + 1 / FPS
    return (f"{path} ends at {end:.1f} s of the {listed_s:.1f} s its header lists ({held} frames): "
            f"the file may be cut short (an unfinished download or copy); its frames were sampled from those {held}")


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("name", list(UNTRUSTED_COUNTS))
@pytest.mark.parametrize("held", [9, 18])
def test_an_mkv_webm_or_avi_cut_short_says_where_its_frames_end(tmp_path, monkeypatch, backend, name, held):
    """Found by fuzzing: cut at 30 % (or 60 %), these were sampled from the frames they hold with no
    note (an MP4's or MOV's index tells, and gets one). Where the frames really end (the last
    packet's time, known to decord from opening the file, to PyAV from demuxing what decoding left)
    is told against where the header says the stream ends."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    whole = _untrusted(name, tmp_path)
    path = cut_at_frame(whole, tmp_path / f"cut{whole.suffix}", held)
    result = load_video(path, 8)
    assert (result.num_total_frames, result.listed_frames) == (held, None)
    assert result.indices == frame_indices(held, FPS, 8) == _shown(result)
    assert result.shortfall_note == _ends_note(path, held, 3.0)
    whole_result = load_video(whole, 8)
    assert (whole_result.num_total_frames, whole_result.ends_at, whole_result.shortfall_note) == (30, None, None)


def test_an_avi_cut_after_its_last_sampled_frame_is_sampled_again_from_the_frames_it_holds(tmp_path, monkeypatch):
    """Frames 57…59 of 60 lost: the frames the header's 60 sample (…, 48, 55) lie before the cut, so
    decoding never reached it. The packets after the last one decoded are demuxed (not decoded): the
    AVI holds 57, which are sampled, and the note says so."""
    monkeypatch.setenv(BACKEND_ENV, "pyav")
    whole = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    path = _cut(whole, tmp_path, 57)
    assert frame_indices(FRAMES, FPS, 8)[-1] < 57 and read_header(path, orientation=False).frames == FRAMES
    result = load_video(path, 8)
    assert result.num_total_frames == 57
    assert result.indices == frame_indices(57, FPS, 8) == _shown(result)
    assert result.shortfall_note == _ends_note(path, 57, 6.0)
    ranged = load_video(path, 8, start=1.0, end=3.0)  # the range ends well before the cut: nothing more is read
    assert ranged.indices == frame_indices(FRAMES, FPS, 8, 1.0, 3.0) and ranged.shortfall_note is None


def _remuxed(source, path):
    """`source` remuxed (no re-encoding) into `path`'s container: an MP4's time base (1/600 here)
    becomes an AVI's frame rate, each packet one tick long, the count running to the end of the last."""
    with av.open(str(source)) as reading, av.open(str(path), "w") as writing:
        stream = reading.streams.video[0]
        out = writing.add_stream_from_template(stream)
        for packet in reading.demux(stream):
            if packet.dts is not None:
                packet.stream = out
                writing.mux(packet)
    return path


def _last_frame_long(path):
    """20 frames 1/30 s apart in a time base of 1/1000 s, the last one shown for 2 s (variable frame
    rate, as a screen recording's): an AVI's count (in ticks) runs to its end, its packets do not."""
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        packets = []
        for number in range(20):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts, frame.time_base = number * 33, Fraction(1, 1000)
            packets += stream.encode(frame)
        packets += stream.encode()
        packets[-1].duration = 2000
        for packet in packets:
            container.mux(packet)
    return path


@pytest.mark.parametrize("backend", video_backends())
def test_whole_mkv_webm_and_avi_files_get_no_note(tmp_path, monkeypatch, backend):
    """Rates whose frames do not fall on MKV's milliseconds, a few frames or one, B-frames, an MP4
    remuxed into MKV and AVI (as the demo clip): where the frames end is within two frames of the
    header's end, and no note calls them cut short."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    made = []
    for name, (codec, extra) in UNTRUSTED_COUNTS.items():
        if codec == "mpeg4" or codec in av.codecs_available:
            for frames, fps in ((1, 24), (2, 30000 / 1001), (45, 30000 / 1001), (37, 24000 / 1001), (20, 60)):
                made.append(write_numbered_video(tmp_path / f"{frames}_{fps:.0f}_{name}", frames, fps, codec, **extra))
    mp4 = write_numbered_video(tmp_path / "clip.mp4", 24, 12)
    made += [_remuxed(mp4, tmp_path / "remuxed.mkv"), _remuxed(mp4, tmp_path / "remuxed.avi")]
    made += [_last_frame_long(tmp_path / "long_last.avi"), _last_frame_long(tmp_path / "long_last.mkv")]
    for path in made:
        try:
            result = load_video(path, 8)
        except MediaError:  # decord forced: it cannot open some (a one-frame MKV); PyAV reads them
            assert backend == "decord"
            continue
        assert (result.ends_at, result.shortfall_note) == (None, None), path.name


def _with_longer_audio(path, frames: int, audio_s: float):
    """An MKV of numbered frames at FPS whose audio track runs `audio_s` seconds: the file's duration."""
    import numpy as np

    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width, video.height = VIDEO_SIZE
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        audio.layout = "mono"
        for number in range(frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")))
        container.mux(video.encode())
        for second in range(int(audio_s)):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
            sound.sample_rate, sound.pts = 8000, second * 8000
            container.mux(audio.encode(sound))
        container.mux(audio.encode())
    return path


@pytest.mark.parametrize("backend", video_backends())
def test_an_mkv_whose_audio_runs_longer_than_its_video_is_not_called_cut_short(tmp_path, monkeypatch, backend):
    """The file's duration is its longest track's: the video track's own (its DURATION tag) is the
    one its frames are told against. A cut one still is."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = _with_longer_audio(tmp_path / "talk.mkv", 20, 4)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(4.0, abs=0.1)
    result = load_video(path, 8)
    assert (result.num_total_frames, result.shortfall_note) == (20, None)
    cut = cut_at_frame(path, tmp_path / "cut.mkv", 9)
    result = load_video(cut, 8)
    assert result.num_total_frames == 9 and result.shortfall_note == _ends_note(cut, 9, 2.0)


@pytest.mark.parametrize("backend", video_backends())
def test_an_mkv_whose_audio_runs_longer_is_measured_and_ranged_by_its_video(tmp_path, monkeypatch, backend):
    """2 s of video (20 frames at 10 fps) in a 4 s file: the attach line said 4.0 s, from the
    file's duration, and took a range from 2.5 s that decoding refused; a range of 1–1.9 s must be
    frames 10…19, not spread over the file's 4 s (frames 5…9 once ranges kept to the attach
    line's length). The video track's own duration (its DURATION tag) is its length."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = _with_longer_audio(tmp_path / "talk.mkv", 20, 4)
    assert probe_video(path)[2] == pytest.approx(2.0)
    result = load_video(path, 2, start=1.0, end=1.9)
    assert result.fps == FPS and result.indices == frame_indices(20, FPS, 2, 1.0, 1.9) == _shown(result)

def test_without_its_tracks_own_duration_an_mkv_is_told_against_the_files_only_where_it_has_no_other_track():
    stream = SimpleNamespace(metadata={})
    alone, with_audio = SimpleNamespace(streams=[stream]), SimpleNamespace(streams=[stream, object()])
    assert video_header.track_duration(alone, stream, 4.0) == 4.0
    assert video_header.track_duration(with_audio, stream, 4.0) == 0.0  # the audio may run longer
    tagged = SimpleNamespace(metadata={"DURATION": "00:01:02.500000000"})
    assert video_header.track_duration(with_audio, tagged, 4.0) == 62.5
    for odd in ("", "soon", "00:61:00.0", "-1:00:00"):
        assert video_header.track_duration(with_audio, SimpleNamespace(metadata={"DURATION": odd}), 4.0) == 0.0


def test_the_outermost_structure_tells_a_whole_file_from_a_cut_one(tmp_path):
    """An MKV's or WebM's Segment, an AVI's RIFF chunks, declare their size: a cut file's runs past
    its end, a whole one's does not (its frames are then not told against its header at all). A
    live MKV's Segment has an unknown size: it cannot tell."""
    for name in ("mpeg4.mkv", "mpeg4.avi", "vp9.webm"):
        if UNTRUSTED_COUNTS[name][0] not in ("mpeg4", *av.codecs_available):
            continue
        whole = _untrusted(name, tmp_path)
        kind = "avi" if whole.suffix == ".avi" else "matroska"
        assert video_header.ends_past_the_file(whole, kind) is False, name
        assert video_header.ends_past_the_file(cut_at_frame(whole, tmp_path / f"cut{whole.suffix}", 12), kind) is True, name
    whole = _untrusted("mpeg4.mkv", tmp_path)
    data = bytearray(whole.read_bytes())
    at = data.index(bytes.fromhex("18538067")) + 4
    assert data[at] == 0x01  # an 8-byte size
    data[at : at + 8] = bytes.fromhex("01ffffffffffffff")
    live = tmp_path / "live.mkv"
    live.write_bytes(bytes(data))
    assert video_header.ends_past_the_file(live, "matroska") is None
    assert video_header.ends_past_the_file(whole, "avi") is None  # not an AVI


def test_the_structure_check_refuses_a_fifo_instead_of_waiting_for_a_writer(tmp_path):
    """ends_past_the_file opened the path with a blocking open: a FIFO swapped in after PyAV read
    the header waited for a writer forever. It cannot tell then."""
    fifo = tmp_path / "pipe.mkv"
    os.mkfifo(fifo)
    outcome, stuck = [], []
    for kind in ("matroska", "avi"):
        # in a thread so a regression (a blocking open) fails the test instead of hanging it
        check = threading.Thread(target=lambda: outcome.append(video_header.ends_past_the_file(fifo, kind)), daemon=True)
        check.start()
        check.join(timeout=60)
        if check.is_alive():  # unblock the stuck open before failing
            stuck.append(kind)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            check.join(timeout=60)
    assert stuck == [] and outcome == [None, None]


@pytest.mark.parametrize("check", [video_header._mp4_sample_bomb, lambda path: video_header._lost_index(path, True)],
                         ids=["sample bomb", "lost index"])
def test_the_mp4_box_checks_refuse_a_fifo_instead_of_waiting_for_a_writer(tmp_path, check):
    """_mp4_sample_bomb and _lost_index opened the path with a blocking open: a FIFO swapped in
    after the file was checked waited for a writer forever. They tell nothing then (None)."""
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    outcome = []
    # in a thread so a regression (a blocking open) fails the test instead of hanging it
    reader = threading.Thread(target=lambda: outcome.append(check(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    stuck = reader.is_alive()
    if stuck:  # unblock the stuck open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=60)
    assert not stuck and outcome == [None]


@pytest.mark.parametrize("name", list(UNTRUSTED_COUNTS))
def test_an_mkv_webm_or_avi_cut_inside_its_frames_is_known_as_it_is_attached(tmp_path, name):
    """The attach line (measure_video) said nothing of these: the cut was found only as the frames
    were decoded, and noted after the answer. A few of the elements' headers tell where the end of
    the file falls: inside the frames (an MKV's Cluster, an AVI's movi list), or not."""
    whole = _untrusted(name, tmp_path)
    assert (measure_video(whole).ends_early, read_header(whole, orientation=False).frames_cut) == (False, None)
    for held in (0, 9, 18, 24):
        cut = cut_at_frame(whole, tmp_path / f"cut{whole.suffix}", held)
        if whole.suffix == ".avi" and not held:  # its packets are demuxed: none held
            with pytest.raises(MediaError) as refused:
                measure_video(cut)
            assert str(refused.value) == (f"{cut} holds none of the 30 frames its header lists: the file is cut short "
                                          "(an unfinished download or copy); use a complete copy")  # fmt: skip
            continue
        length = measure_video(cut)
        assert length.ends_early, (name, held)
        if whole.suffix == ".avi":  # its count is the whole file's, its duration a guess from its size: demuxed
            assert (length.frames, length.duration, length.listed_frames) == (held, held / FPS, None)
        elif not held:  # its cluster holds no frame whole: how long it is, decoding finds
            assert (length.frames, length.duration, length.listed_frames) == (30, 3.0, None)
        else:  # the length its whole blocks reach (the header's 3.0 s was the attach line's), as decoding finds it
            with av.open(str(cut)) as container:  # B-frames: the latest frame shown may come after some the cut took
                end = max(float(p.pts * p.time_base) for p in container.demux(video=0) if p.size) + 1 / FPS
            assert length.duration == pytest.approx(end, abs=0.002) and length.frames == round(end * FPS), (name, held)
            assert length.listed_frames is None
            assert load_video(cut, 8).ends_at[0] == pytest.approx(length.duration, abs=0.002)


@pytest.mark.parametrize("inside", [0, 5, 15])  # frame 30: a chunk of 8 + 22 bytes
def test_an_avi_cut_short_is_measured_at_attach_as_decoding_samples_it(tmp_path, monkeypatch, inside):
    """An AVI cut short loses its index (idx1, at its end): its header's count is the whole file's
    (60) and FFmpeg's duration a guess from its size (4.5 s for 3.0 s held). The attach line gave
    those; the frames held are demuxed instead. Cut a few bytes into frame 30, FFmpeg gives the
    part (flagged corrupt) and the decoder conceals the rest: decoding counted it (31 frames, the
    last a stand-in) while where the frames end said 30."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    with av.open(str(whole)) as container:
        pos = [p.pos for p in container.demux(video=0) if p.size][30]
    path = tmp_path / "cut.avi"
    path.write_bytes(whole.read_bytes()[: pos + inside])
    assert measure_video(path) == VideoLength(30, FPS, 3.0, ends_early=True)
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames) == ("pyav", 30)
    assert result.indices == frame_indices(30, FPS, 8) == _shown(result)


def test_a_remuxed_avi_cut_short_takes_the_time_range_its_attach_line_allows(tmp_path, monkeypatch):
    """An AVI remuxed from an MKV (`ffmpeg -i clip.mkv -c copy clip.avi`) states its time base's
    1000 fps and counts a chunk a millisecond; cut short, the attach line gives the 30 frames it
    holds over 3.0 s. A range inside those 3.0 s was refused as the message was sent: "start 2.0 s
    is at or past the end of the video (0.03 s)", the 30 frames at 1000 a second."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = remux_video(write_numbered_video(tmp_path / "clip.mkv", FRAMES, FPS, "mpeg4"), tmp_path / "whole.avi")
    path = cut_at_frame(whole, tmp_path / "cut.avi", 30)
    length = measure_video(path)
    assert (length.frames, length.duration, length.ends_early) == (30, 3.0, True)
    result = load_video(path, 4, start=2.0, end=2.9)
    assert result.num_total_frames == 30 and all(20 <= shown <= 29 for shown in _shown(result)), _shown(result)
    assert _shown(result) == result.indices


def test_an_avi_cut_after_its_frames_is_measured_from_its_count_not_its_size(tmp_path):
    """Cut before its index (idx1), an AVI holds every frame: FFmpeg's duration, a guess from its
    size and bit rate without the index, said 5.4 s for 6.0 s."""
    whole = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    data = whole.read_bytes()
    path = tmp_path / "cut.avi"
    path.write_bytes(data[: data.rindex(b"idx1")])
    assert measure_video(path) == VideoLength(FRAMES, FPS, 6.0)


@pytest.mark.parametrize("name", ["mpeg4.mkv", "vp9.webm", "mpeg4.avi"])
def test_a_file_cut_after_its_frames_is_not_called_cut_short_as_it_is_attached(tmp_path, name):
    """Cut in the index that follows the frames (an MKV's Cues, an AVI's idx1): every frame is held,
    though the outermost structure runs past the end of the file. Cut before its last two frames'
    end, an MKV is not called short either (as the note after the answer does not)."""
    whole = _untrusted(name, tmp_path)
    data = whole.read_bytes()
    index = data.rindex(b"idx1") if whole.suffix == ".avi" else data.rindex(bytes.fromhex("1C53BB6B"))
    cut = tmp_path / f"cut{whole.suffix}"
    cut.write_bytes(data[: index + 10])
    header = read_header(cut, orientation=False)
    assert header.runs_past_end and header.frames_cut is False
    assert not measure_video(cut).ends_early
    if whole.suffix != ".avi":
        near = cut_at_frame(whole, tmp_path / f"near{whole.suffix}", 29)
        assert read_header(near, orientation=False).frames_cut is False
        assert load_video(near, 8).shortfall_note is None


def test_an_mkv_cut_in_its_audio_after_the_video_ends_is_not_called_cut_short_as_it_is_attached(tmp_path):
    """Its video ends at 2 s, its audio at 4 s: a cut in the clusters of audio alone loses no frame."""
    path = _with_longer_audio(tmp_path / "talk.mkv", 20, 4)
    data = path.read_bytes()
    assert not measure_video(path).ends_early
    assert measure_video(cut_at_frame(path, tmp_path / "cut.mkv", 9)).ends_early
    late = tmp_path / "late.mkv"
    late.write_bytes(data[: len(data) * 9 // 10])
    assert read_header(late, orientation=False).runs_past_end
    assert load_video(late, 8).shortfall_note is None  # all 20 frames: decoding agrees
    assert not measure_video(late).ends_early


def test_frames_hidden_by_an_edit_list_after_an_empty_edit_are_not_counted(tmp_path, monkeypatch):
    """The trimmed clip (60 frames stored, the first 5 hidden), shown from 1 s: an empty edit first.
    FFmpeg's duration (6.0 s) then holds all 60 frames, so the index's discard flags were not read:
    the attach line counted 60 frames, and decoding, which found 55, noted the file "may be cut
    short (an unfinished download or copy)"."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = with_empty_edit(write_trimmed_video(tmp_path / "trimmed.mp4", FRAMES, hidden=5), tmp_path / "delayed.mp4", 1.0)
    assert read_header(path, orientation=False).frames_shown == 55
    assert probe_video(path)[0] == 55
    result = load_video(path, 8)
    assert (result.num_total_frames, result.listed_frames, result.shortfall_note) == (55, None, None)
    assert _shown(result) == [5 + index for index in result.indices]

@pytest.mark.parametrize("backend", video_backends())
def test_an_mkv_whose_first_frame_comes_after_0_is_told_against_its_length_from_that_frame(tmp_path, monkeypatch, backend):
    """20 frames 40 ms apart from 1 s: 0.8 s, as the attach line says, and its header ends them at
    1.8 s. Cut only after its frames (in its Cues), decord, whose frame times count from the first,
    found them ending at 0.8 s of 1.8 s and called it cut short; cut after frame 9, the note gave
    PyAV's 1.4 s of 1.8 s. Both count from the first frame now: 0.4 s of 0.8 s."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_late_start_video(tmp_path / "late.mkv", 20, first_ms=1000)
    with av.open(str(path)) as container:
        frames_end = max(packet.pos + packet.size for packet in container.demux(video=0) if packet.size)
    tail = tmp_path / "tail.mkv"
    tail.write_bytes(path.read_bytes()[: frames_end + 4])
    assert read_header(tail, orientation=False).runs_past_end
    result = load_video(tail, 4)
    assert result.num_total_frames == 20 and result.shortfall_note is None
    cut = cut_at_frame(path, tmp_path / "cut.mkv", 9)
    result = load_video(cut, 4)
    assert result.num_total_frames == 9
    assert result.shortfall_note.startswith(f"{cut} ends at 0.4 s of the 0.8 s its header lists (9 frames): ")

def _ebml(element: int, payload: bytes, size: bytes | None = None) -> bytes:
    """An EBML element: its id, its size (an 8-byte one unless `size` is given), its payload."""
    head = element.to_bytes((element.bit_length() + 7) // 8, "big")
    return head + (size if size is not None else (0x01 << 56 | len(payload)).to_bytes(8, "big")) + payload


def test_hostile_element_sizes_end_the_walk_without_an_answer(tmp_path):
    """The walk over a cut file's elements reads only their headers, one step each, and stops after
    a bound: zero sizes (each element its header only), sizes past any file, elements nested in a
    chain of Clusters, a Cluster of 300,000 empty blocks. Only a Cluster cut before any block it
    holds (with a Timecode of 0: the frames end at its start) calls the frames cut."""
    header = VideoHeader(64, 64, FPS, 0, 3.0, "matroska,webm", None, None, track_duration=3.0, runs_past_end=True)
    ebml = _ebml(0x1A45DFA3, _ebml(0x4282, b"matroska"))
    huge = bytes.fromhex("01fffffffffffffe")  # 2^56 - 2 bytes
    cluster_head = bytes.fromhex("1F43B675") + huge + bytes.fromhex("E78100")
    cases = {
        "voids": ebml + bytes.fromhex("18538067") + huge + bytes.fromhex("EC80") * 300_000,
        "a huge first element": ebml + bytes.fromhex("18538067") + huge + bytes.fromhex("114D9B74") + huge,
        "an empty cluster": ebml + bytes.fromhex("18538067") + huge + bytes.fromhex("1F43B67580"),
        "blocks": ebml + bytes.fromhex("18538067") + huge + cluster_head + bytes.fromhex("A380") * 300_000,
        "clusters in clusters": ebml + bytes.fromhex("18538067") + huge + cluster_head * 20_000,
        "no timecode": ebml + bytes.fromhex("18538067") + huge + bytes.fromhex("1F43B675") + huge + bytes.fromhex("A384810000"),
        "ones": ebml + bytes.fromhex("18538067") + huge + b"\xff" * 100_000,
        "zeros": ebml + bytes.fromhex("18538067") + huge + bytes(100_000),
        "no segment": ebml + bytes(100),
    }
    for what, data in cases.items():
        path = tmp_path / "hostile.mkv"
        path.write_bytes(data)
        cut = what == "clusters in clusters"  # the first, cut after its Timecode of 0: no Cluster is walked into twice
        assert video_header.frames_cut_off(path, header, 0.001) is (True if cut else None), what
    avi = VideoHeader(64, 64, FPS, 30, 3.0, "avi", None, None, runs_past_end=True)
    riff = b"RIFF" + (2**32 - 2).to_bytes(4, "little") + b"AVI "  # huge (2**32 - 1 is a size never filled in)
    cases = {
        "empty chunks": riff + b"JUNK" + bytes(4) * 2 * 100_000,
        "riffs": (b"RIFF" + (4).to_bytes(4, "little") + b"AVI ") * 10_000,
        "a huge hdrl": riff + b"LIST" + (2**32 - 1).to_bytes(4, "little") + b"hdrl",
        "not riff": b"\xff" * 1000,
        "a looping super index": _looping_super_index(riff),
    }
    expected = {"empty chunks": None, "riffs": None, "a huge hdrl": True, "not riff": None,  # hdrl cut: no frame held
                "a looping super index": True}  # fmt: skip
    for what, data in cases.items():
        path = tmp_path / "hostile.avi"
        path.write_bytes(data)
        assert video_header.frames_cut_off(path, avi, 0.001) is expected[what], what


def _looping_super_index(riff: bytes) -> bytes:
    """An AVI cut in its movi list whose super index claims 2^32 − 1 index chunks and lists one,
    where the movi list's frames start, of size 0: the walk over them stays in place."""
    indx = (4).to_bytes(2, "little") + bytes(2) + (2**32 - 1).to_bytes(4, "little") + b"00dc" + bytes(12)
    hdrl = _chunk(b"LIST", b"hdrl" + _chunk(b"LIST", b"strl" + _chunk(b"indx", indx + bytes(16))))
    listed = (len(riff) + len(hdrl) + 12).to_bytes(8, "little") + bytes(8)
    hdrl = _chunk(b"LIST", b"hdrl" + _chunk(b"LIST", b"strl" + _chunk(b"indx", indx + listed)))
    return riff + hdrl + b"LIST" + (2**32 - 2).to_bytes(4, "little") + b"movi" + b"00dc" + bytes(100)


def test_the_walk_over_a_long_cut_mkv_reads_a_page_per_cluster_not_the_file(tmp_path, monkeypatch):
    """Attaching stays cheap: 200 Clusters of a MiB each (a sparse file), the last one cut after its
    first block. Only their headers are read: a few KiB each, not the 200 MiB."""
    header = VideoHeader(64, 64, FPS, 0, 300.0, "matroska,webm", None, None, track_duration=300.0, runs_past_end=True)
    cluster = 1 << 20
    path = tmp_path / "long.mkv"
    with open(path, "wb") as f:
        f.write(_ebml(0x1A45DFA3, _ebml(0x4282, b"matroska")) + bytes.fromhex("18538067") + bytes.fromhex("01fffffffffffffe"))
        for number in range(200):
            timecode = _ebml(0xE7, (number * 1000).to_bytes(4, "big"))  # the Cluster's Timecode, ms
            f.write(_ebml(0x1F43B675, timecode, size=(0x01 << 56 | cluster).to_bytes(8, "big")))
            f.seek(cluster - len(timecode), os.SEEK_CUR)
        last = _ebml(0xE7, (200_000).to_bytes(4, "big")) + _ebml(0xA3, bytes.fromhex("810000800000"))
        f.write(_ebml(0x1F43B675, last, size=(0x01 << 56 | cluster).to_bytes(8, "big")))  # runs past the end
        f.truncate()
    read = []

    class Counted(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(video_header, "open_regular_file", lambda p: Counted(p, "rb"))
    assert video_header.frames_cut_off(path, header, 0.001) is True  # its frames end at 200 s of 300
    assert sum(read) < 201 * 8192 and path.stat().st_size > 200 * cluster


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("lost", [1, 2])
def test_an_avi_missing_its_last_frames_is_noted_as_its_attach_line_says(tmp_path, monkeypatch, backend, lost):
    """Cut before its last one or two frames, an AVI's movi list runs past the end of the file: the
    attach line said "cut short", while the note after the answer, allowing two frames for where a
    header's end is not quite its frames', said nothing. The file's own elements say it is cut
    inside its frames: the note tells a frame lost too (a remuxed AVI's, whose rate is its time base's, as well)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    numbered = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    remuxed = _remuxed(write_numbered_video(tmp_path / "clip.mp4", 30, FPS), tmp_path / "remuxed.avi")
    for whole, frames in ((numbered, FRAMES), (remuxed, 30)):
        path = cut_at_frame(whole, tmp_path / f"cut_{whole.name}", frames - lost)
        assert measure_video(path).ends_early, whole.name
        try:
            result = load_video(path, 8)
        except MediaError:  # decord forced: it cannot open some; PyAV reads them
            assert backend == "decord"
            continue
        assert result.num_total_frames == frames - lost, whole.name
        assert result.shortfall_note == _ends_note(path, frames - lost, frames / FPS), whole.name



def test_an_avi_cut_inside_its_last_frame_is_noted_and_sampled_without_it(tmp_path, monkeypatch):
    """Cut halfway through its last frame: FFmpeg gives the half packet (flagged corrupt, read short)
    and the decoder conceals what it lacks, so the frames seemed to end where the header says, and
    no note came, though the attach line said "cut short". The half frame is not one held."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    whole = write_numbered_video(tmp_path / "whole.avi", FRAMES, FPS, "mpeg4")
    path = cut_at_frame(whole, tmp_path / "cut.avi", FRAMES - 1, inside=True)
    assert measure_video(path).ends_early
    result = load_video(path, FRAMES)
    assert (result.backend, result.num_total_frames) == ("pyav", FRAMES - 1)
    assert result.indices == frame_indices(FRAMES - 1, FPS, FRAMES) == _shown(result)
    assert result.shortfall_note == (f"{path} ends at 5.9 s of the 6.0 s its header lists (59 frames): the file may be cut short "
                                     "(an unfinished download or copy); its frames were sampled from those 59")  # fmt: skip


# ---------------------------------------------------------------- an OpenDML AVI (over 1 GB: RIFF AVIX chunks)


def _chunk(name: bytes, payload: bytes) -> bytes:
    return name + len(payload).to_bytes(4, "little") + payload + bytes(len(payload) & 1)


def _opendml(path: Path, folder: Path, index_at: int | None = None, split: int = 15) -> tuple[Path, dict[str, int]]:
    """FFmpeg's AVI of 30 numbered frames rewritten as a file over 1 GB is, in small: frames
    0…split−1 in the movi list of RIFF 'AVI ', the rest in that of a RIFF 'AVIX'; each movi list
    closed by a standard index chunk (ix00) of its frames (or, `index_at`, the AVIX's placed before
    that frame), which the super index (indx, in the stream's strl list: FFmpeg's header keeps a
    JUNK chunk of its size for it) lists. Also where each ix00 starts."""
    data = write_numbered_video(folder / "plain.avi", 30, FPS, "mpeg4").read_bytes()
    movi, idx1 = data.index(b"movi") - 8, data.rindex(b"idx1")
    frames, at = [], movi + 12
    while at < idx1:
        size = int.from_bytes(data[at + 4 : at + 8], "little")
        frames.append(data[at : at + 8 + size + (size & 1)])
        at += 8 + size + (size & 1)
    keys = [int.from_bytes(data[at + 4 : at + 8], "little") & 0x10 for at in range(idx1 + 8, idx1 + 8 + 16 * 30, 16)]
    assert len(frames) == 30 and all(f[:4] == b"00dc" for f in frames)
    indx = data.index(b"JUNK", data.index(b"strf"))  # FFmpeg's place for the super index

    def movi_list(start: int, numbers: list[int], index_before: int | None) -> tuple[bytes, int]:
        """The movi list at `start` of these frames and their ix00, and where the ix00 starts."""
        body, entries, ix_at = b"movi", b"", None
        for number in numbers + [None]:
            if number == index_before or (number is None and ix_at is None):
                ix_at = start + 8 + len(body)
                body += b"\0" * (32 + 8 * len(numbers))  # filled in below, once the frames' places are known
            if number is not None:
                entries += (len(body) + 8 - 4).to_bytes(4, "little")  # from the 'movi' name, to the frame's data
                entries += (len(frames[number]) - 8 | (0 if keys[number] else 1 << 31)).to_bytes(4, "little")
                body += frames[number]
        index = _chunk(b"ix00", (2).to_bytes(2, "little") + bytes([0, 1]) + len(numbers).to_bytes(4, "little") + b"00dc"
                       + (start + 8).to_bytes(8, "little") + bytes(4) + entries)  # fmt: skip
        at = ix_at - start - 8
        body = body[:at] + index + body[at + len(index) :]
        return _chunk(b"LIST", body), ix_at

    head = data[12:movi]
    first, first_ix = movi_list(movi, list(range(split)), None)
    riff = _chunk(b"RIFF", b"AVI " + head + first)
    second, second_ix = movi_list(len(riff) + 12, list(range(split, 30)), index_at)
    avix = _chunk(b"RIFF", b"AVIX" + second)
    size = int.from_bytes(data[indx + 4 : indx + 8], "little")
    entries = b"".join(at.to_bytes(8, "little") + (32 + 8 * count).to_bytes(4, "little") + count.to_bytes(4, "little")
                       for at, count in ((first_ix, split), (second_ix, 30 - split)))  # fmt: skip
    super_index = b"indx" + size.to_bytes(4, "little") + (4).to_bytes(2, "little") + bytes(2) + (2).to_bytes(4, "little")
    super_index += b"00dc" + bytes(12) + entries
    out = bytearray(riff + avix)
    out[indx : indx + len(super_index)] = super_index
    path.write_bytes(bytes(out))
    return path, {"first ix00": first_ix, "last ix00": second_ix}


def test_an_opendml_avi_cut_inside_its_last_index_is_not_called_cut_short_as_it_is_attached(tmp_path):
    """An AVI over 1 GB (OpenDML) closes each RIFF chunk's movi list with a standard index chunk
    (ix00) of its frames: cut inside the last one, the movi list runs past the end of the file, and
    the attach line said "cut short" though every frame is held. Cut inside the frames, or in an
    index with frames after it (the first RIFF chunk's, or one placed before the last frames), it is."""
    whole, at = _opendml(tmp_path / "whole.avi", tmp_path)
    assert read_header(whole, orientation=False).runs_past_end is False
    assert measure_video(whole) == VideoLength(30, FPS, 3.0)
    data = whole.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: at["last ix00"] + 40])  # its header and an entry
    header = read_header(cut, orientation=False)
    assert (header.runs_past_end, header.frames_cut) == (True, False)
    assert not measure_video(cut).ends_early
    result = load_video(cut, 8)
    assert (result.num_total_frames, result.shortfall_note) == (30, None)  # decoding agrees: every frame
    cut.write_bytes(data[: at["first ix00"] + 40])  # the AVIX's frames lost
    assert read_header(cut, orientation=False).frames_cut is True
    assert read_header(cut_at_frame(whole, cut, 20, inside=True), orientation=False).frames_cut is True
    early, at = _opendml(tmp_path / "early.avi", tmp_path, index_at=25)
    cut.write_bytes(early.read_bytes()[: at["last ix00"] + 40])
    assert read_header(cut, orientation=False).frames_cut is True  # frames 25…29 follow the index


# ---------------------------------------------------------------- an AVI written to a pipe


class _Pipe(io.RawIOBase):
    """A file that cannot seek, as a pipe or a socket: FFmpeg's AVI muxer cannot fill in its header."""

    def __init__(self, file) -> None:
        self._file = file

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._file.write(data)


def _written_to_a_pipe(path: Path, frames: int = 30) -> Path:
    """Numbered frames at FPS, muxed to a pipe, as `ffmpeg … -f avi pipe:1 > out.avi` writes them."""
    with open(path, "wb") as file, av.open(_Pipe(file), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for number in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")))
        container.mux(stream.encode())
    return path


def test_an_avi_written_to_a_pipe_is_measured_and_sampled_from_the_frames_it_holds(tmp_path, monkeypatch):
    """Its header holds FFmpeg's placeholders (1,073,741,824 frames, sizes of 0xFFFFFFFF): it was
    refused as declaring more frames than a real video has, though it is whole and plays. Its
    frames are counted by demuxing, as an MKV's; it is not called cut short (its sizes tell nothing)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = _written_to_a_pipe(tmp_path / "piped.avi")
    data = path.read_bytes()
    assert data[4:8] == b"\xff\xff\xff\xff" and data[data.index(b"movi") - 4 : data.index(b"movi")] == b"\xff\xff\xff\xff"
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 1 << 30  # the placeholder FFmpeg reads
    header = read_header(path, orientation=False)
    assert (header.unfilled, header.frames, header.duration, header.runs_past_end, header.frames_cut) == (True, 0, 0.0, None, None)
    assert measure_video(path) == VideoLength(30, FPS, 3.0)
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames, result.shortfall_note) == ("pyav", 30, None)
    assert result.indices == frame_indices(30, FPS, 8) == _shown(result)
    ranged = load_video(path, 4, start=1.0, end=2.0)
    assert ranged.indices == frame_indices(30, FPS, 4, 1.0, 2.0) == _shown(ranged)


def test_an_avi_written_to_a_pipe_and_cut_short_is_sampled_from_what_it_holds(tmp_path, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = cut_at_frame(_written_to_a_pipe(tmp_path / "piped.avi"), tmp_path / "cut.avi", 18)
    assert measure_video(path) == VideoLength(18, FPS, 1.8)  # the count is what it holds: no length to tell it against
    result = load_video(path, 8)
    assert result.num_total_frames == 18 and result.indices == frame_indices(18, FPS, 8) == _shown(result)


def test_an_avi_whose_writer_left_its_sizes_0_is_measured_as_one_written_to_a_pipe(tmp_path, monkeypatch):
    """Writers other than FFmpeg leave the sizes they could not fill in 0, not 0xFFFFFFFF: its
    header's placeholder count was taken as true (refused as more frames than a real video has)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    data = bytearray(_written_to_a_pipe(tmp_path / "piped.avi").read_bytes())
    movi = data.index(b"movi")
    data[4:8] = data[movi - 4 : movi] = bytes(4)
    path = tmp_path / "zero.avi"
    path.write_bytes(bytes(data))
    header = read_header(path, orientation=False)
    assert (header.unfilled, header.frames, header.runs_past_end, header.frames_cut) == (True, 0, None, None)
    assert measure_video(path) == VideoLength(30, FPS, 3.0)
    result = load_video(path, 8)
    assert (result.backend, result.num_total_frames, result.shortfall_note) == ("pyav", 30, None)

def test_decord_forced_on_an_avi_written_to_a_pipe_is_refused_in_one_line(tmp_path):
    """decord allocates for the 2^30 frames the placeholder lists: the process aborted (std::bad_alloc).
    Run apart, so that an abort fails this test rather than ending the run."""
    pytest.importorskip("decord")
    path = _written_to_a_pipe(tmp_path / "piped.avi")
    code = ("from internvl_chat.errors import MediaError\n"
            "from internvl_chat.media.video import load_video\n"
            f"try:\n    load_video({str(path)!r}, 8)\nexcept MediaError as e:\n    print(e)\n")  # fmt: skip
    import subprocess
    import sys

    env = {**os.environ, BACKEND_ENV: "decord", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == (f"decord cannot read video {path}: unset {BACKEND_ENV} (it forces decord) or set it to pyav "
                                   "(decord: an AVI written to a pipe, its header never filled in)")  # fmt: skip


def test_a_header_that_counts_nothing_bounds_nothing_so_demuxing_stops_at_the_frame_limit(tmp_path, monkeypatch):
    """A hostile AVI may claim to be written to a pipe so that its count is not checked: its frames
    are counted by demuxing, which stops once past the limit (it ran to the end of the file)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = _written_to_a_pipe(tmp_path / "piped.avi")
    monkeypatch.setattr(video_header, "MAX_FRAMES", 10)
    demuxed = []
    add = video_header.PacketSpan.add
    monkeypatch.setattr(video_header.PacketSpan, "add", lambda span, packet: (demuxed.append(packet.size), add(span, packet))[1])
    message = f"{path} holds more than 10 frames; the file is damaged or not a real video"
    with pytest.raises(MediaError) as refused:
        measure_video(path)
    assert str(refused.value) == message and len(demuxed) <= 11
    with pytest.raises(MediaError, match="holds more than 10 frames"):
        load_video(path, 8)


def _counted_clip(tmp_path: Path, kind: str) -> Path:
    """A clip whose header stores no usable length, so its frames are counted by demuxing."""
    if kind == "pipe AVI":
        return _written_to_a_pipe(tmp_path / "piped.avi")
    if kind == "MPEG-PS":  # FFmpeg guesses its duration from the bit rate
        return write_numbered_video(tmp_path / "clip.mpg", 30, 30, "mpeg1video")
    path = tmp_path / "moving.png"  # APNG: no count, no duration
    frames = [Image.fromarray(numbered_frame(n)) for n in range(40)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    return path


@pytest.mark.parametrize("kind", ["pipe AVI", "MPEG-PS", "APNG"])
def test_the_length_a_counted_clip_has_at_its_rate_is_held_to_the_duration_limit(tmp_path, monkeypatch, kind):
    """Its length is its frames ÷ its rate, unchecked: a hostile header's tiny rate made an enormous
    one. It gets the duration limit, and the words, that a header's duration gets (here the limit is
    made smaller than the clip, which is 1 to 3 s long)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = _counted_clip(tmp_path, kind)
    frames, fps, duration = probe_video(path)
    monkeypatch.setattr(video_header, "MAX_DURATION_S", 0.5)
    message = f"{path} declares a duration of {frames / fps:g} s; the file is damaged or not a real video"
    with pytest.raises(MediaError) as refused:
        measure_video(path)
    assert str(refused.value) == message
    monkeypatch.setenv(BACKEND_ENV, "pyav")  # the decoder that counts by demuxing (decord counts in its own index)
    with pytest.raises(MediaError) as refused:
        load_video(path, 4)
    assert str(refused.value) == message


@pytest.mark.parametrize("kind", ["pipe AVI", "APNG"])
def test_counting_frames_by_demuxing_stops_at_the_next_packet_once_cancelled(tmp_path, monkeypatch, kind):
    """The count a clip without one needs ran to the end of the file whatever happened: the client
    that sent it gone (serve measures it with plan_video), Ctrl-C at /video (measure_video)."""
    from internvl_chat.errors import Cancelled
    from internvl_chat.media.video import plan_video

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = _counted_clip(tmp_path, kind)
    add = video_header.PacketSpan.add
    for measure in (lambda cancel: measure_video(path, cancel), lambda cancel: plan_video(path, 4, lambda w, h: None, cancel)):
        cancel, demuxed = threading.Event(), []

        def counted(span, packet) -> None:
            add(span, packet)
            demuxed.append(packet)
            if len(demuxed) == 5:  # the client leaves as the fifth packet is counted
                cancel.set()

        monkeypatch.setattr(video_header.PacketSpan, "add", counted)
        with pytest.raises(Cancelled):
            measure(cancel)
        assert len(demuxed) == 5  # the worker saw it before the sixth (the caller left at once)
        demuxed.clear()
        with pytest.raises(Cancelled):  # set before it starts: no packet is counted
            measure(_set_event())
        assert demuxed == []


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event
