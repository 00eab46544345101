"""Frame sampling: indices against a plain reimplementation; real videos whose frames show their own
number, decoded with both backends; bad files and ranges."""

from __future__ import annotations

import enum
import math
import random
import types
from pathlib import Path

import av
import numpy as np
import pytest
from media_helpers import (
    heic_photo,
    numbered_frame,
    read_frame_number,
    reference_normalize,
    remux_video,
    video_backends,
    write_audio_only,
    write_empty_video,
    write_late_start_video,
    write_numbered_video,
    write_padded_video,
)
from PIL import Image

from internvl_chat.errors import MediaError, UsageError
from internvl_chat.files import visible
from internvl_chat.media import video as media_video
from internvl_chat.media import video_header
from internvl_chat.media.video import BACKEND_ENV, load_video, probe_video
from internvl_chat.media.video_sampling import frame_indices, range_rate, used_range


def expected_indices(total: int, fps: float, n: int, start: float | None = None, end: float | None = None) -> list[int]:
    """The published sampling, vectorised with numpy (np.round also rounds half to even)."""
    first = 0 if start is None else int(np.clip(np.round(start * fps), 0, total - 1))
    last = total - 1 if end is None else int(np.clip(np.round(end * fps), 0, total - 1))
    seg = (last - first) / n
    return np.floor(first + seg / 2 + np.round(seg * np.arange(n))).astype(int).tolist()


# ---------------------------------------------------------------- indices (pure)


def test_indices_hand_computed():
    # 40 frames, 8 segments of 4.875: k·4.875 rounds to 0, 5, 10, 15, 20 (19.5, to even), 24, 29, 34
    assert frame_indices(40, 30.0, 8) == [2, 7, 12, 17, 22, 26, 31, 36]
    # seg 2.5: round(2.5) is 2 (half to even), so 1.25 + 2 → 3, not 4
    assert frame_indices(6, 30.0, 2) == [1, 3]
    # 1 s … 3 s at 25 fps is frames 25 … 75, seg 12.5: 31, 43 (12.5 → 12), 56, 69 (37.5 → 38)
    assert frame_indices(100, 25.0, 4, start=1.0, end=3.0) == [31, 43, 56, 69]
    assert frame_indices(1, 30.0, 4) == [0, 0, 0, 0]
    assert frame_indices(5, 30.0, 10) == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4]  # more frames asked than exist: repeats
    assert frame_indices(30, 30.0, 3, end=100.0) == frame_indices(30, 30.0, 3)  # end past the clip: clamped
    assert frame_indices(30, 30.0, 2, start=0.99) == [29, 29]  # round(29.7) = 30 is clamped to the last frame


@pytest.mark.parametrize("start, end", [(0.0, math.inf), (math.nan, 1.0), (0.0, math.nan)])
def test_indices_refuse_bounds_that_are_not_finite(start, end):
    with pytest.raises(MediaError, match="not finite"):  # was OverflowError / ValueError from round()
        frame_indices(30, 30.0, 2, start=start, end=end)


def test_indices_match_reimplementation_over_many_cases():
    rng = random.Random(1234)
    cases = 0
    for total in [1, 2, 3, 5, 8, 13, 30, 31, 64, 99, 100, 101, 250, 1000, 4321]:
        for fps in [30.0, 30000 / 1001, 24.0, 25.0, 12.5, 60.0]:
            duration = total / fps
            for n in [1, 2, 3, 4, 7, 8, 16, 32, 33, 100]:
                ranges = [(None, None), (None, duration * 0.6), (duration * 0.3, None)]
                for _ in range(3):
                    start = rng.uniform(0, duration * 0.95)
                    ranges.append((start, rng.uniform(start + 1e-3, duration * 1.2)))
                for start, end in ranges:
                    got = frame_indices(total, fps, n, start, end)
                    assert got == expected_indices(total, fps, n, start, end), (total, fps, n, start, end)
                    assert len(got) == n and all(0 <= i < total for i in got)
                    assert got == sorted(got)
                    cases += 1
    assert cases > 5000


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(num_frames=-2), "num_frames"),
        (dict(num_total_frames=0), "no frames"),
        (dict(start=-0.5), "negative"),
        (dict(end=-1.0), "negative"),
        (dict(start=4.0), "past the end"),  # 120 frames at 30 fps last 4 s
        (dict(start=9.0, end=10.0), "past the end"),
        (dict(start=2.0, end=2.0), "not after start"),
        (dict(start=2.0, end=1.0), "not after start"),
        (dict(end=0.0), "not after start"),
        (dict(fps=0.0, start=1.0), "frame rate"),
    ],
)
def test_index_errors(kwargs, words):
    args = dict(num_total_frames=120, fps=30.0, num_frames=8) | kwargs
    with pytest.raises(MediaError) as err:
        frame_indices(**args)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("total, fps", [(30, 10.0), (91, 30.0), (100, 29.97), (2400, 240.0), (7, 3.0)])
def test_the_range_used_ends_at_the_video_and_samples_the_same_frames(total, fps):
    """An end past the video becomes the video's end (to 1/100 s), for labels and session files;
    the frames it samples are the same as for the end asked for."""
    duration = total / fps
    start = duration / 3
    used = used_range((start, 1000.0), duration)
    assert used[0] == start and duration <= used[1] < duration + 0.01 and used[1] == round(used[1], 2)
    assert frame_indices(total, fps, 8, *used) == frame_indices(total, fps, 8, start, 1000.0)
    assert used_range((start, duration / 2), duration) == (start, duration / 2)  # within the video: as asked
    assert used_range((duration, 1000.0), duration) == (duration, 1000.0)  # a start past the end is refused later
    assert used_range(None, duration) is None and used_range((1.0, 1000.0), 0.0) == (1.0, 1000.0)


@pytest.mark.parametrize("read", [probe_video, load_video])
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "(No such file or directory); check the path"),
        ("folder", "(Is a directory); check the path"),
        ("no permission", "(Permission denied); check its permissions"),
        ("not a video", "(Invalid data found when processing input); use an MP4, MKV, WebM or AVI file"),
    ],
)
def test_a_file_pyav_cannot_open_is_one_line_with_the_path_escaped(tmp_path, monkeypatch, read, kind, reason):
    """PyAV's own text was `[Errno 1094995529] Invalid data found when processing input: '/the/path'`:
    an errno, and the path a second time, unescaped. The line has the path once, escaped, then
    FFmpeg's reason and what to do. The file is opened by PyAV as it is then (check_media_file
    looked at it earlier: it may have changed since)."""
    import errno

    folder = tmp_path / "odd\x1b[31m\u202e"
    folder.mkdir()
    path = folder / "clip.mp4"
    if kind == "folder":
        path.mkdir()
    elif kind == "not a video":
        path.write_text("hello, not a video")
    elif kind == "no permission":  # chmod 000 does not stop root: PyAV's error as FFmpeg gives it
        def refuse(name, *args, **kwargs):
            raise av.error.PermissionError(errno.EACCES, "Permission denied", name)

        monkeypatch.setattr(av, "open", refuse)
    monkeypatch.setattr(media_video, "check_media_file", lambda p, what: p)
    with pytest.raises(MediaError) as err:
        read(path)
    line = str(err.value)
    assert line == f"cannot read video {visible(str(path))} {reason}"
    assert "Errno" not in line and line.count("clip.mp4") == 1 and line.isprintable()


# ---------------------------------------------------------------- real videos

HAS_X264 = "libx264" in av.codecs_available
HAS_VP9 = "libvpx-vp9" in av.codecs_available

# name: (frames, fps, codec, options); x264 uses B-frames and a short GOP, so decoding needs seeks
VIDEOS = {
    "intra.mp4": (40, 30, "mpeg4", dict(gop=1)),
    "ntsc.mp4": (45, 30000 / 1001, "mpeg4", {}),
    "bframes.mp4": (100, 25, "libx264", dict(options={"crf": "12", "g": "10"})),
    "nocount.mkv": (37, 24, "libx264", dict(options={"crf": "12"})),  # MKV stores no frame count
    "vp9.webm": (33, 30, "libvpx-vp9", {}),
    "short.mp4": (6, 4, "mpeg4", dict(gop=1)),  # 1.5 s
}


def _available(name: str) -> bool:
    codec = VIDEOS[name][2]
    return codec == "mpeg4" or (codec == "libx264" and HAS_X264) or (codec == "libvpx-vp9" and HAS_VP9)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    made = {}
    for name, (frames, fps, codec, extra) in VIDEOS.items():
        if _available(name):
            made[name] = write_numbered_video(folder / name, frames, fps, codec, **extra)
    return made


SAMPLINGS = [(8, None, None), (16, None, None), (5, 0.3, 1.2), (3, 1.0, None), (4, None, 0.5), (1, None, None)]


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("name", list(VIDEOS))
def test_sampled_frames_are_the_expected_ones(videos, monkeypatch, backend, name):
    if name not in videos:
        pytest.skip(f"codec {VIDEOS[name][2]} not in this PyAV build")
    monkeypatch.setenv(BACKEND_ENV, backend)
    total, fps = VIDEOS[name][0], float(VIDEOS[name][1])
    for n, start, end in SAMPLINGS:
        want = expected_indices(total, fps, n, start, end)
        result = load_video(videos[name], num_frames=n, start=start, end=end)
        assert result.backend == backend
        assert result.num_total_frames == total
        assert result.fps == pytest.approx(fps)
        assert result.indices == want
        shown = [read_frame_number(tile) for tile in result.pixel_values.numpy()]
        assert shown == want, (name, n, start, end)
        assert result.timestamps == pytest.approx([i / fps for i in want])
        assert tuple(result.pixel_values.shape) == (n, 3, 448, 448)
        assert result.num_frames == n and result.path == videos[name]
        assert result.shortfall_note is None  # whole: no note calls it cut short


@pytest.mark.parametrize("backend", video_backends())
def test_more_frames_than_the_clip_has_repeat(videos, monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    result = load_video(videos["short.mp4"], num_frames=12)
    want = expected_indices(6, 4.0, 12)
    assert len(set(want)) < 12
    assert [read_frame_number(t) for t in result.pixel_values.numpy()] == want == result.indices


@pytest.mark.parametrize("backend", video_backends())
def test_frame_pixels_are_the_image_tile_transform(videos, monkeypatch, backend):
    """Each frame is one tile: the decoded RGB frame resized bicubic to S×S and normalised."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    result = load_video(videos["intra.mp4"], num_frames=3, image_size=224)
    with av.open(str(videos["intra.mp4"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for tile, index in zip(result.pixel_values.numpy(), result.indices):
        resized = np.asarray(Image.fromarray(frames[index]).resize((224, 224), Image.BICUBIC))
        np.testing.assert_allclose(tile, reference_normalize(resized), atol=2e-6)


@pytest.mark.parametrize("backend", video_backends())
def test_tiles_equal_the_full_frame_path_on_every_clip(videos, monkeypatch, backend):
    """Reducing each frame as soon as it is decoded changes nothing: the tiles equal those made
    from the full decoded frames afterwards (decord's frames from its own batch read)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    for name, path in videos.items():
        result = load_video(path, num_frames=5, start=0.05)
        if backend == "pyav":
            with av.open(str(path)) as container:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            frames = [decoded[i] for i in result.indices]
        else:
            import decord

            frames = list(decord.VideoReader(str(path), num_threads=1).get_batch(result.indices).asnumpy())
        for tile, frame in zip(result.pixel_values.numpy(), frames):
            resized = np.asarray(Image.fromarray(frame).resize((448, 448), Image.BICUBIC))
            np.testing.assert_allclose(tile, reference_normalize(resized), atol=2e-6, err_msg=name)


def test_decord_and_pyav_give_the_same_frames(videos, monkeypatch):
    pytest.importorskip("decord")
    for name in videos:
        results = {}
        for backend in ("decord", "pyav"):
            monkeypatch.setenv(BACKEND_ENV, backend)
            results[backend] = load_video(videos[name], num_frames=7, start=0.1)
        assert results["decord"].indices == results["pyav"].indices
        assert results["decord"].fps == pytest.approx(results["pyav"].fps)
        assert results["decord"].num_total_frames == results["pyav"].num_total_frames
        # both decode through FFmpeg and convert to RGB the same way, so pixels agree closely
        diff = (results["decord"].pixel_values - results["pyav"].pixel_values).abs()
        assert diff.mean().item() < 0.02, name


# Streams decord 0.6 seeks in wrongly (it returned other frames, repeated or out of order, with no
# error): B-frames of MPEG-4 Part 2 (Xvid-style) even in MP4, MPEG-2 in AVI, H.264 in MPEG-TS
SEEK_TRAPS = {
    "bframes_mpeg4.mp4": ("mpeg4", dict(options={"bf": "2"})),
    "mpeg2.avi": ("mpeg2video", {}),
    "bframes_h264.ts": ("libx264", dict(options={"bf": "3", "g": "12"})),
}


@pytest.mark.parametrize("name", list(SEEK_TRAPS))
def test_the_default_backend_gives_the_frames_asked_for_where_decord_would_seek_wrong(tmp_path, monkeypatch, name):
    codec, extra = SEEK_TRAPS[name]
    if codec == "libx264" and not HAS_X264:
        pytest.skip("no libx264 in this PyAV build")
    path = write_numbered_video(tmp_path / name, 60, 30, codec, **extra)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    result = load_video(path, num_frames=7)
    assert result.indices == expected_indices(60, 30.0, 7)
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices, result.backend


def test_probe_reads_the_header(videos):
    for name, path in videos.items():
        total, fps = VIDEOS[name][0], float(VIDEOS[name][1])
        frames, rate, duration = probe_video(path)
        assert frames == total and rate == pytest.approx(fps)
        assert duration == pytest.approx(total / fps, abs=0.05)


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("name", ["late.mkv", "late.webm", "late.mp4"])
def test_a_video_whose_first_frame_is_shown_after_0_is_measured_from_it(tmp_path, monkeypatch, backend, name):
    """20 frames 40 ms apart, the first at 1 s: 0.8 s, 20 frames. An MKV's (WebM's) header gives
    where its frames end (1.8 s) as its duration, and the attach line said "of 1.8 s" (45 frames
    by the estimate), accepted a range from 1 s that decoding then refused as past the end, and
    let a range end at 1.5 s that the frames, numbered from the first, end before."""
    codec = "vp8" if name.endswith(".webm") else "mpeg4"
    if codec not in av.codecs_available:
        pytest.skip(f"codec {codec} not in this PyAV build")
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_late_start_video(tmp_path / name, 20, first_ms=1000, codec=codec)
    assert probe_video(path) == (20, pytest.approx(25.0), pytest.approx(0.8, abs=0.001))
    assert used_range((0.5, 1.5), probe_video(path)[2]) == (0.5, 0.8)
    result = load_video(path, num_frames=4, start=0.4, end=0.8)
    assert result.num_total_frames == 20 and result.indices == expected_indices(20, 25.0, 4, 0.4, 0.8)
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices
    assert result.shortfall_note is None


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV without libx264")
@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mov"])
def test_every_frame_of_a_variable_rate_mp4_with_b_frames_is_sampled(tmp_path, monkeypatch, backend, name):
    """10 frames at 10 fps, then 10 at 25 (a phone's or screen recorder's variable rate), with
    B-frames. FFmpeg's average rate (13.5 fps) times the duration (1.36 s) is 18 frames, fewer than
    the 20 stored, which was taken for an edit list hiding 2: frames 18 and 19 were never sampled
    (the last of 8 tiles showed frame 16, not 18). Only frames the index flags hidden are not shown."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    times = [100 * number for number in range(10)] + [940 + 40 * number for number in range(10)]
    path = write_late_start_video(tmp_path / name, 20, 0, codec="libx264", times_ms=times, options={"bf": "3", "g": "8"})
    assert probe_video(path)[0] == 20
    result = load_video(path, num_frames=8)
    assert result.num_total_frames == 20 and result.listed_frames is None
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices == expected_indices(20, result.fps, 8)


@pytest.mark.parametrize("backend", video_backends())
def test_an_mkv_whose_first_frame_comes_weeks_in_is_not_refused_as_too_long(tmp_path, monkeypatch, backend):
    """0.8 s of frames from 2,000,000 s (times kept from a long-running capture): the duration
    limit was applied to where its frames end, and the file refused as declaring 2e+06 s."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_late_start_video(tmp_path / "capture.mkv", 20, first_ms=2_000_000_000)
    assert probe_video(path) == (20, pytest.approx(25.0), pytest.approx(0.8, abs=0.001))
    result = load_video(path, num_frames=4)
    assert result.num_total_frames == 20 and result.shortfall_note is None
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices == expected_indices(20, 25.0, 4)

VFR_TIMES_MS = [100 * number for number in range(10)] + [940 + 40 * number for number in range(10)]  # 1.36 s


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize("name", ["vfr.mkv", "vfr.webm", "vfr.avi"])
def test_a_range_within_a_variable_rate_video_is_sampled_not_refused(tmp_path, monkeypatch, backend, name):
    """20 frames in 1.36 s whose header says 25 fps (20 frames at it last 0.8 s), or, remuxed to an
    AVI, 1000 fps (1,360 slots, all but 20 dropped: 0.02 s). The attach line measured 1.36 s and
    took a range from 1 s; decoding, which measured the frames it counts at the stated rate,
    refused it as "past the end of the video (0.80 s)" (0.02 s). Both measure the same length now,
    and seconds map to frames at the rate the frames really run (20 ÷ 1.36 s): 1–1.3 s is 15…19."""
    codec = "vp8" if name.endswith(".webm") else "mpeg4"
    if codec not in av.codecs_available:
        pytest.skip(f"codec {codec} not in this PyAV build")
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_late_start_video(tmp_path / name.replace(".avi", ".mkv"), 20, 0, codec=codec, times_ms=VFR_TIMES_MS)
    if name.endswith(".avi"):
        path = remux_video(path, tmp_path / name)
    assert probe_video(path)[2] == pytest.approx(1.36, abs=0.001)
    result = load_video(path, num_frames=2, start=1.0, end=1.3)
    assert result.num_total_frames == 20 and result.fps == pytest.approx(20 / 1.36, rel=0.01)
    assert result.indices == expected_indices(20, result.fps, 2, 1.0, 1.3) == [16, 18]
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices
    media_video.decode_cost(path, 2, 1.0, 1.3)  # serve plans the same range: not refused either
    with pytest.raises(MediaError, match=r"past the end of the video \(1\.36 s\)"):
        load_video(path, num_frames=2, start=1.36)


NTSC = 30000 / 1001


@pytest.mark.parametrize(
    ("frames", "fps", "length"),
    [
        (30, 25.0, 1.24),  # its last frame lasts two: 1.0000000000000009 frames off in floating point
        (30, 10.0, 3.1),
        (250, 10.0, 25.1),
        (30, 25.0, 1.16),  # a frame short
        (30, NTSC, 1.035),  # 31 frames at 29.97 end at 1.0343 s, which an MKV rounds to the millisecond
        (30, 25.0, 1.22),  # half a frame
        (30, NTSC, 1.001),
    ],
)
def test_a_constant_rate_video_padded_by_at_most_a_frame_keeps_its_stated_rate(frames, fps, length):
    """"More than one frame off" must not catch a constant-rate file whose length is one frame
    longer (a last frame given the length of two) or whose MKV rounded it: its seconds map to
    frames at the stated rate, as the published formula does."""
    assert range_rate(frames, fps, length) == fps


@pytest.mark.parametrize(("frames", "fps", "length"), [(20, 25.0, 1.36), (20, 1000.0, 1.36), (30, 25.0, 1.28)])
def test_a_video_whose_frames_end_further_from_its_length_is_ranged_at_their_average_rate(frames, fps, length):
    assert range_rate(frames, fps, length) == pytest.approx(frames / length)


@pytest.mark.parametrize(("frames", "fps", "length"), [(0, 25.0, 1.0), (10, 0.0, 1.0), (10, 25.0, 0.0), (0, 0.0, 0.0)])
def test_range_rate_of_no_frames_rate_or_length_does_not_raise(frames, fps, length):
    assert range_rate(frames, fps, length) >= 0


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize(("name", "fps", "span"), [("pad.mkv", 25.0, (0.1, 0.3)), ("pad.webm", NTSC, (0.5, 0.95))])
def test_a_constant_rate_mkv_whose_last_frame_lasts_two_is_sampled_at_its_stated_rate(tmp_path, monkeypatch, backend, name,
                                                                                     fps, span):  # fmt: skip
    """30 frames whose last lasts two (1.24 s at 25 fps; 1.035 s at 29.97, to the millisecond):
    the length was taken as more than one frame off the 30 frames' 1.2 s, and the range mapped at
    24.19 fps (29.97: 28.99), frames 2, 4, 5 for 0.1–0.3 s where the published formula takes 3, 5, 7."""
    codec = "vp8" if name.endswith(".webm") else "mpeg4"
    if codec not in av.codecs_available:
        pytest.skip(f"codec {codec} not in this PyAV build")
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_padded_video(tmp_path / name, 30, fps, 2, codec)
    assert probe_video(path)[2] == pytest.approx(31 / fps, abs=0.001)
    result = load_video(path, 3, *span)
    assert result.fps == pytest.approx(fps) and result.num_total_frames == 30
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices == expected_indices(30, fps, 3, *span)


@pytest.mark.parametrize("backend", video_backends())
def test_a_tag_that_is_not_utf8_does_not_refuse_the_video(tmp_path, monkeypatch, backend):
    # found by fuzzing: PyAV decodes tags strictly, so a Latin-1 title (here the encoder tag) made
    # the video "cannot read video … ('utf-8' codec can't decode byte 0xe9 …); use an MP4 …"
    data = write_numbered_video(tmp_path / "clip.mp4", 6, 10).read_bytes()
    assert data.count(b"Lavf") == 1
    path = tmp_path / "latin1.mp4"
    path.write_bytes(data.replace(b"Lavf", b"L\xe9vf"))
    monkeypatch.setenv(BACKEND_ENV, backend)
    assert probe_video(path)[:2] == (6, pytest.approx(10.0))
    assert load_video(path, num_frames=2).indices == expected_indices(6, 10.0, 2)


def _probe_and_load_refusals(path: Path) -> list[str]:
    """The MediaError messages probe_video (the attach line) and load_video each refuse `path` with."""
    refusals = []
    for call in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            call(path)
        refusals.append(str(err.value))
    return refusals


def test_a_codec_ffmpeg_cannot_decode_is_named(tmp_path):
    # found by fuzzing: an unknown sample entry without its decoder config leaves PyAV no codec
    # context, and the reason was "('NoneType' object has no attribute 'width'); use an MP4 …"
    data = write_numbered_video(tmp_path / "clip.mp4", 4, 10).read_bytes()
    assert data.count(b"mp4v") == 1 and data.count(b"esds") == 1
    path = tmp_path / "unknown.mp4"
    path.write_bytes(data.replace(b"mp4v", b"zzzz").replace(b"esds", b"xxxx"))
    for refusal in _probe_and_load_refusals(path):
        assert refusal == f"{path} stores its video in a codec FFmpeg cannot decode; re-encode it as an H.264 MP4"


# ---------------------------------------------------------------- backend choice


def test_backend_choice(videos, monkeypatch):
    path = videos["intra.mp4"]
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    try:
        import decord  # noqa: F401

        assert load_video(path, 2).backend == "decord"  # preferred when it imports
    except ImportError:
        assert load_video(path, 2).backend == "pyav"
    monkeypatch.setenv(BACKEND_ENV, " PyAV ")
    assert load_video(path, 2).backend == "pyav"

    monkeypatch.setattr(media_video, "_import_decord", lambda: None)  # as if decord were missing
    monkeypatch.delenv(BACKEND_ENV)
    assert load_video(path, 2).backend == "pyav"
    monkeypatch.setenv(BACKEND_ENV, "decord")
    with pytest.raises(MediaError) as err:
        load_video(path, 2)
    assert "decord" in str(err.value)

    monkeypatch.setenv(BACKEND_ENV, "opencv")
    with pytest.raises(UsageError) as err:
        load_video(path, 2)
    assert BACKEND_ENV in str(err.value)


# ---------------------------------------------------------------- bad input


def _bad_files(tmp_path, videos) -> dict:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    half = tmp_path / "half.mp4"
    data = videos["intra.mp4"].read_bytes()
    half.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: unreadable
    image = tmp_path / "still.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "missing": (tmp_path / "nope.mp4", "does not exist"),
        "folder": (tmp_path, "folder"),
        "text": (text, "cannot read video"),
        "empty": (empty, "the file is empty (0 bytes; an unfinished download or copy?); use a complete copy"),
        "truncated": (half, "has no index (an MP4 or MOV without its moov box): the file is cut short"),
        "audio only": (write_audio_only(tmp_path / "sound.wav"), "no video stream"),
        "garbage": (image, "still picture"),  # FFmpeg's PNG demuxer takes it: a picture, not a video
    }


@pytest.mark.parametrize("backend", [None, *video_backends()])
def test_bad_files(tmp_path, videos, monkeypatch, backend):
    if backend is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, backend)
    for what, (path, words) in _bad_files(tmp_path, videos).items():
        with pytest.raises(MediaError) as err:
            load_video(path)
        text = str(err.value)
        assert "\n" not in text, what
        if backend != "decord" or what in ("missing", "folder"):  # decord words its own reasons
            assert words in text, (what, text)


@pytest.mark.parametrize("backend", [None, *video_backends()])
def test_video_without_frames(tmp_path, monkeypatch, backend):
    if backend is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_empty_video(tmp_path / "empty.avi")
    with pytest.raises(MediaError) as err:
        load_video(path)
    if backend != "decord":  # decord cannot open it at all; without forcing, PyAV then explains
        assert "no video frames" in str(err.value)
    with pytest.raises(MediaError):
        probe_video(path)


def _first_frame_zeroed(made, path):
    """A copy of `made` whose first frame's data is all zeros: FFmpeg finds no pixel format while
    it probes the stream."""
    with av.open(str(made)) as container:
        pos, size = next((p.pos, p.size) for p in container.demux(video=0) if p.size)
    data = bytearray(made.read_bytes())
    data[pos : pos + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


def test_forced_decord_failing_says_what_failed_and_how_to_use_pyav(tmp_path, monkeypatch):
    """Found by fuzzing: with decord forced, a file it could not open was refused with its C++
    check ("cannot read video … (Check failed: avfilter_graph_create_filter(&buffersrc_ctx_, …) >= 0
    (-22 vs. 0) Cannot create buffer source); use an MP4, MKV, WebM or AVI file")."""
    pytest.importorskip("decord")
    monkeypatch.setenv(BACKEND_ENV, "decord")
    path = _first_frame_zeroed(write_numbered_video(tmp_path / "made.mkv", 20, 10), tmp_path / "bad\x1b.mkv")
    with pytest.raises(MediaError) as err:
        load_video(path, 4)
    assert str(err.value) == (f"decord cannot read video {visible(str(path))}: unset {BACKEND_ENV} (it forces decord) or "
                              "set it to pyav (decord: Cannot create buffer source)")  # fmt: skip


def test_decords_reason_is_shortened_and_escaped():
    from internvl_chat.media.video_sources import DECORD_DETAIL_CHARS, decord_detail

    check = RuntimeError("[12:00:01] /src/video/ffmpeg/filter_graph.cc:54: Check failed: send(&ctx_, pkt) >= 0 "
                         "(-1094995529 vs. 0) Error sending\x1b[2J packet.\n\nStack trace:\n  [bt] (0) libdecord.so(+0x1)")  # fmt: skip
    assert decord_detail(check) == visible("Error sending\x1b[2J packet.") and "\x1b" not in decord_detail(check)
    long = decord_detail(RuntimeError("x" * 500))
    assert len(long) == DECORD_DETAIL_CHARS and long.endswith("…")


def test_probe_errors(tmp_path, videos):
    for what, (path, words) in _bad_files(tmp_path, videos).items():
        with pytest.raises(MediaError) as err:
            probe_video(path)
        assert "\n" not in str(err.value)
        if what != "garbage":  # the header alone may read fine; probing does not decode
            assert words in str(err.value), what


def test_a_song_with_cover_art_has_no_video_stream(tmp_path):
    # its artwork is a one-frame video stream at 90,000 "frames per second": the file was called damaged
    if "libmp3lame" not in av.codecs_available:
        pytest.skip("no MP3 encoder in this PyAV build")
    path = tmp_path / "song.mp3"
    with av.open(str(path), "w") as container:
        audio = container.add_stream("libmp3lame", rate=44100)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width = cover.height = 64
        cover.pix_fmt = "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        for packet in [*cover.encode(av.VideoFrame.from_ndarray(numbered_frame(3)[:, :64].copy(), format="rgb24")), *cover.encode()]:
            container.mux(packet)
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 4410), np.float32), format="fltp", layout="mono")
        sound.sample_rate = 44100
        for packet in [*audio.encode(sound), *audio.encode()]:
            container.mux(packet)
    for refusal in _probe_and_load_refusals(path):
        assert refusal == f"{path} has no video stream (only a cover picture); pass a video file"


@pytest.mark.parametrize("flag_type", [enum.Flag, enum.IntFlag, int])
def test_a_cover_picture_is_skipped_however_pyav_types_the_disposition(flag_type):
    # PyAV 15's disposition is an enum.Flag: int() of it raised, and no video opened there
    class Disposition(enum.Flag if flag_type is enum.Flag else enum.IntFlag):
        default = 0x0001
        attached_pic = 0x0400

    def flags(value: int):
        return Disposition(value) if flag_type is not int else value

    cover = types.SimpleNamespace(disposition=flags(0x0400 | 0x0001))
    frames = types.SimpleNamespace(disposition=flags(0x0001))
    container = types.SimpleNamespace(streams=types.SimpleNamespace(video=[cover, frames]))
    assert video_header.video_stream(container) is frames
    assert video_header.video_stream(types.SimpleNamespace(streams=types.SimpleNamespace(video=[cover]))) is None


def test_with_two_video_streams_the_frames_come_from_the_stream_the_header_was_read_from(tmp_path, monkeypatch):
    """decord reads the stream FFmpeg rates best, the header (its size, turn and frame rate) and
    PyAV the first one: which backend ran decided which stream the model saw."""
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=1)  # a poster frame, as some tools write one
        still.width, still.height, still.pix_fmt = 64, 48, "yuvj420p"
        clip = container.add_stream("mpeg4", rate=30)
        clip.width, clip.height, clip.pix_fmt = 64, 48, "yuv420p"
        for packet in [*still.encode(av.VideoFrame.from_ndarray(numbered_frame(200), format="rgb24")), *still.encode()]:
            container.mux(packet)
        for number in range(30):
            for packet in clip.encode(av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")):
                container.mux(packet)
        for packet in clip.encode():
            container.mux(packet)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    result = load_video(path, num_frames=4)
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == [200] * 4, result.backend


@pytest.mark.parametrize("kind", ["MPEG-PS", "APNG"])
def test_a_header_without_a_usable_frame_count_or_duration_is_probed_by_counting(tmp_path, kind):
    """An MPEG program stream (.mpg) stores no frame count and FFmpeg guesses its duration from the
    bit rate (here 1/60 of the real one); an animated PNG stores neither. The probe estimated under
    one frame and refused them ("has no video frames"), though their frames decode: /video and the
    server refused a playable clip."""
    if kind == "MPEG-PS":
        path = write_numbered_video(tmp_path / "clip.mpg", 30, 30, "mpeg1video")
        total, fps = 30, 30.0
    else:
        path = tmp_path / "moving.png"
        frames = [Image.fromarray(numbered_frame(n)) for n in range(40)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
        total, fps = 40, 25.0
    frames, rate, duration = probe_video(path)
    assert (frames, rate) == (total, pytest.approx(fps)) and duration == pytest.approx(total / fps)
    result = load_video(path, num_frames=5)
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices == expected_indices(total, fps, 5)


@pytest.mark.parametrize("backend", video_backends())
def test_bad_ranges_on_a_real_file(videos, monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = videos["intra.mp4"]  # 40 frames at 30 fps: 1.33 s
    for kwargs, words in [
        (dict(num_frames=0), "num_frames"),
        (dict(start=1.34), "past the end"),
        (dict(start=-1.0), "negative"),
        (dict(start=1.0, end=0.5), "not after start"),
    ]:
        with pytest.raises(MediaError) as err:
            load_video(path, **kwargs)
        assert words in str(err.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_a_still_picture_given_as_a_video_says_to_attach_it_as_an_image(tmp_path, fmt):
    # FFmpeg opens it as a one-frame stream whose header counts no frames: "has no video frames" misled
    path = tmp_path / "holiday.mp4"
    Image.new("RGB", (64, 48), "red").save(path, fmt)
    for refusal in _probe_and_load_refusals(path):
        assert "still picture" in refusal and "as an image" in refusal, refusal


def test_an_animated_webp_given_as_a_video_is_not_called_a_still_picture(tmp_path):
    # FFmpeg opens it as a still picture and cannot decode its next frames: "a still picture" it is not
    path = tmp_path / "sticker.webp"
    frames = [Image.new("RGB", (64, 48), colour) for colour in ("red", "green", "blue")]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    for refusal in _probe_and_load_refusals(path):
        assert refusal == (f"{path} is an animated image that FFmpeg cannot play as a video; attach (or send) it as an "
                           "image (its first frame is used), or convert it to MP4 or GIF")


def test_a_heic_photo_given_as_a_video_says_to_attach_it_as_an_image(tmp_path):
    # an ftyp box, and no moov: it was "an MP4 without its moov box: the file is cut short"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(heic_photo())
    for refusal in _probe_and_load_refusals(path):
        assert refusal == f"{path} is a HEIC image, not a video; attach (or send) it as an image instead"


@pytest.mark.parametrize(
    "name, data, what",
    [("notes.png", b"hello, this is text\nline 2\n", "text"), ("paper.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "a PDF document"),
     ("noise.bmp", bytes(range(256)) * 8, "binary data")],
)  # fmt: skip
def test_a_file_named_as_a_picture_that_is_none_says_what_it_is(tmp_path, name, data, what):
    # FFmpeg's image demuxers go by the name: a text file called notes.png was "a still picture; attach it as an image"
    path = tmp_path / name
    path.write_bytes(data)
    for refusal in _probe_and_load_refusals(path):
        assert refusal == f"{path} is {what}, not a video or an image; pass a video file (MP4, MKV, WebM or AVI)"


@pytest.mark.parametrize("backend", video_backends())
@pytest.mark.parametrize(("frames", "last_frames"), [(30, 2), (30, 3), (250, 26)])
def test_an_mp4_whose_last_frame_lasts_longer_is_ranged_at_its_headers_rate_by_both_decoders(tmp_path, monkeypatch, backend,
                                                                                            frames, last_frames):  # fmt: skip
    """An MP4's stated rate is its frames' average, the last one's length included (250 frames at
    25 fps, the last lasting about a second: 250 ÷ 11 s): it is not "more than a frame off", and
    seconds map to frames at it with either decoder. decord's own rate (25) mapped 8–9 s to other
    frames than PyAV's before ranges were measured against the header's length."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_padded_video(tmp_path / "still_end.mp4", frames, 25.0, last_frames)
    length = (frames - 1 + last_frames) / 25
    span = (0.5, 0.9) if frames == 30 else (8.0, 9.0)
    assert probe_video(path) == (frames, pytest.approx(frames / length), pytest.approx(length))
    result = load_video(path, 3, *span)
    assert result.fps == pytest.approx(frames / length)
    assert [read_frame_number(tile) for tile in result.pixel_values.numpy()] == result.indices == expected_indices(
        frames, frames / length, 3, *span)
