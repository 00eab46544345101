"""The video containers beyond MP4/MKV/AVI (media/formats.py's VIDEO_EXTENSIONS): MPEG-PS, MPEG-TS,
3GP/3G2, FLV, Ogg and ASF, each a tiny generated clip attached by a path typed in a message and by
/video, its length at attach and its frames decoded checked, by decord where it is used (with PyAV
as its fallback) and by PyAV alone (a machine without decord). A .ts or .mts that is TypeScript
source is not taken for one."""

from __future__ import annotations

import re
from pathlib import Path

import av
import pytest

from app_helpers import make_app, output
from media_helpers import read_frame_number, write_numbered_video
from internvl_chat.media.formats import VIDEO_EXTENSIONS
from internvl_chat.media.video import BACKEND_ENV, load_video, measure_video
from internvl_chat.ui.app import OK
from internvl_chat.ui.media_paths import expand_wildcards
from internvl_chat.ui.paths import find_media_paths

FRAMES = 20
# name → (encoder, frames per second)
CONTAINERS = {
    "clip.mpg": ("mpeg1video", 25),  # MPEG-PS: no length stored, counted by demuxing
    "clip.mpeg": ("mpeg2video", 25),  # FFmpeg's own length of it was one frame
    "clip.3gp": ("mpeg4", 10),
    "clip.3g2": ("libx264", 10),
    "clip.flv": ("flv", 10),
    "h264.flv": ("libx264", 10),  # B-frames start its frames at 0.2 s: its header's length counted them from 0
    "clip.ts": ("libx264", 10),  # decord cannot read H.264 in MPEG-TS: PyAV does
    "clip.m2ts": ("libx264", 10),  # BDAV: 192-byte packets
    "clip.mts": ("mpeg2video", 25),  # decord seeks MPEG-2 in MPEG-TS to other frames: PyAV does
    "clip.ogv": ("libvpx", 10),  # decord cannot measure it: PyAV does (no Theora encoder in PyAV's FFmpeg)
    "clip.wmv": ("wmv2", 10),
    "clip.asf": ("msmpeg4v2", 10),
}


def _encodes(codec: str) -> bool:
    try:
        av.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - UnknownCodecError, or a build without the encoder
        return False
    return True


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("containers")
    made = {}
    for name, (codec, fps) in CONTAINERS.items():
        if _encodes(codec):
            made[name] = write_numbered_video(folder / name, FRAMES, fps, codec)
    return made


def _clip(clips: dict[str, Path], name: str) -> Path:
    if name not in clips:
        pytest.skip(f"no {CONTAINERS[name][0]} encoder in this PyAV build")
    return clips[name]


def _seconds(name: str) -> float:
    return FRAMES / CONTAINERS[name][1]


@pytest.mark.parametrize("name", CONTAINERS)
def test_each_container_is_a_video_extension(name):
    assert Path(name).suffix in VIDEO_EXTENSIONS


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("name", CONTAINERS)
def test_the_length_at_attach_and_the_frames_decoded_are_right(clips, name, backend, monkeypatch):
    # "auto": decord where it seeks the file exactly, PyAV where it cannot read it; "pyav": no decord
    path = _clip(clips, name)
    if backend == "pyav":
        monkeypatch.setenv(BACKEND_ENV, "pyav")
    length = measure_video(path)
    assert (length.frames, length.fps, length.ends_early) == (FRAMES, CONTAINERS[name][1], False)
    assert length.duration == pytest.approx(_seconds(name))
    video = load_video(path, 8)
    assert video.num_total_frames == FRAMES and video.shortfall_note is None
    assert [read_frame_number(tile) for tile in video.pixel_values.numpy()] == video.indices
    assert video.indices == [1, 3, 6, 8, 11, 13, 15, 18]


@pytest.mark.parametrize("name", CONTAINERS)
def test_a_path_typed_in_a_message_attaches_it_and_the_answer_runs(loaded, clips, name, tmp_path):
    path = _clip(clips, name)
    app, out = make_app(loaded, tmp_path, max_new_tokens=2, **{"media.frames": 4})  # 8 fill the 2,048-token context
    result = app.handle_line(f"What happens in {path}?")
    said = output(out)
    assert result == OK, said
    assert re.search(rf"\+ video {re.escape(name)} 4 frames of {_seconds(name):.1f} s", said), said
    turn = app.session.turns[-1]
    assert [m.path for m in turn.media] == [path] and str(path) not in turn.user_text


@pytest.mark.parametrize("name", CONTAINERS)
def test_video_attaches_it_and_the_answer_runs(loaded, clips, name, tmp_path):
    path = _clip(clips, name)
    app, out = make_app(loaded, tmp_path, max_new_tokens=2)
    assert app.handle_line(f"/video {path} --frames 4") == OK
    assert re.search(rf"\+ video {re.escape(name)} 4 frames of {_seconds(name):.1f} s", output(out))
    assert app.handle_line("What happens?") == OK
    assert [m.path for m in app.session.turns[-1].media] == [path]


def _typescript(folder: Path) -> list[Path]:
    source = "const x: number = 1;\nexport default x;\n" * 20  # longer than two MPEG-TS packets
    paths = [folder / "app.ts", folder / "types.mts"]
    for path in paths:
        path.write_text(source)
    return paths


def test_a_pattern_and_a_typed_path_take_these_containers_but_not_typescript(clips, tmp_path):
    for path in clips.values():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    typescript = _typescript(tmp_path)
    found = expand_wildcards(tmp_path / "*", lambda p: p, lambda p: [p], kind="video", what="/video")
    assert [p.name for p in found] == sorted(clips)
    message = " and ".join(str(tmp_path / name) for name in [*sorted(clips), *(p.name for p in typescript)])
    assert [p.name for _, p in find_media_paths(f"compare {message}")] == sorted(clips)


def test_tab_offers_these_containers_but_not_typescript(clips, tmp_path):
    from prompt_toolkit.document import Document

    from internvl_chat.ui.repl import ChatCompleter

    for path in clips.values():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _typescript(tmp_path)
    offered = [c.text for c in ChatCompleter(tmp_path).get_completions(Document("/video ./"), None)]
    assert sorted(Path(text).name for text in offered) == sorted(clips)


def test_a_typescript_path_that_names_no_file_is_not_said_to_be_a_missing_video(tmp_path):
    from internvl_chat.ui.media_paths import take_media_paths

    text, paths, missing = take_media_paths(f"fix {tmp_path}/src/app.ts and {tmp_path}/src/types.mts, not {tmp_path}/gone.mp4")
    assert paths == [] and missing == [tmp_path / "gone.mp4"]


def _write_flv_starting_late(path: Path, codec: str, start_frames: int, fps: int = 10) -> Path:
    """An FLV whose first frame is shown `start_frames` frames after 0 (a clip cut from a stream)."""
    from fractions import Fraction

    from media_helpers import VIDEO_SIZE, numbered_frame

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for number in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts, frame.time_base = start_frames + number, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("codec", ["flv", "libx264"])  # no B-frames; B-frames (their 0.2 s delay on top)
def test_an_flv_whose_frames_start_after_0_is_measured_whole(codec, tmp_path):
    """FFmpeg's onMetaData length of an FLV is its frames' own (with H.264's B-frame delay): the
    start of a clip cut from a stream (1 s here) was taken off it too, and 20 frames measured as 10."""
    if not _encodes(codec):
        pytest.skip(f"no {codec} encoder in this PyAV build")
    path = _write_flv_starting_late(tmp_path / "late.flv", codec, start_frames=10)
    length = measure_video(path)
    assert (length.frames, round(length.duration, 3)) == (FRAMES, FRAMES / 10)


@pytest.mark.parametrize("name", ["app.ts", "types.mts"])
def test_video_names_a_typescript_file_for_what_it_is(name, tmp_path):
    """`/video app.ts` on TypeScript source said FFmpeg's "Invalid data found when processing input"
    and to use "an MP4, MKV, WebM or AVI file": the file is no MPEG transport stream, and it says so."""
    from internvl_chat.errors import MediaError

    path = next(p for p in _typescript(tmp_path) if p.name == name)
    with pytest.raises(MediaError, match=r"is not a video: no MPEG transport stream \(TypeScript source"):
        measure_video(path)
