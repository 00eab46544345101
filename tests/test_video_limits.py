"""Videos that are huge, lie in their header, are damaged, or are interrupted with Ctrl-C.

Memory is measured as the peak resident size of a child process (ru_maxrss): it counts what
FFmpeg, decord and Pillow allocate in C, which tracemalloc does not see. No timings are asserted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import textwrap
from pathlib import Path

import pytest
from media_helpers import video_backends, write_large_video, write_numbered_video

from internvl_chat.errors import Cancelled, MediaError
from internvl_chat.media import video as media_video
from internvl_chat.media.video import BACKEND_ENV, load_video, probe_video

ROOT = Path(__file__).resolve().parents[1]
LARGE = 4096  # side of the large clip: one RGB frame is 48 MiB


def _run_child(code: str, backend: str) -> dict:
    env = dict(os.environ, **{BACKEND_ENV: backend}, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def large_clip(tmp_path_factory):
    return write_large_video(tmp_path_factory.mktemp("large") / "large.mp4", LARGE, frames=4)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", video_backends())
def test_peak_memory_does_not_grow_with_the_number_of_frames(large_clip, backend):
    """12 frames of a 4096×4096 clip need no more memory than 1: each frame is reduced to its
    448×448 tile as soon as it is decoded. (Keeping full frames grew the peak by 14–15 frames.)"""
    code = f"""
        import json, resource
        from internvl_chat.media.video import load_video
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        one = load_video({str(large_clip)!r}, num_frames=1)
        after_one = peak()
        twelve = load_video({str(large_clip)!r}, num_frames=12)
        print(json.dumps(dict(after_one=after_one, after_twelve=peak(), backend=twelve.backend,
                              shape=list(twelve.pixel_values.shape), indices=twelve.indices)))
    """
    got = _run_child(code, backend)
    assert got["backend"] == backend
    assert got["shape"] == [12, 3, 448, 448] and sorted(set(got["indices"])) == [0, 1, 2, 3]
    frame_bytes = LARGE * LARGE * 3
    growth = got["after_twelve"] - got["after_one"]
    assert growth < 3 * frame_bytes, f"peak grew by {growth / frame_bytes:.1f} frames"


# ---------------------------------------------------------------- headers that lie


def _write_raw_avi(path: Path) -> bytes:
    """A 5-frame 64×48 uncompressed AVI: its size, count and rate live only in the header."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("rawvideo", rate=30)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        for number in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * number, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def _patched(data: bytes, fields: list[tuple[bytes, int, int]]) -> bytes:
    """Overwrite 32-bit fields of AVI header chunks: (chunk id, offset in its data, value)."""
    out = bytearray(data)
    for chunk, offset, value in fields:
        at = out.index(chunk) + 8 + offset
        out[at : at + 4] = struct.pack("<I", value)
    return bytes(out)


# strh: dwScale at 20, dwRate at 24, dwLength at 32; avih: dwTotalFrames at 16, dwWidth/Height at 32/36;
# strf (BITMAPINFOHEADER): biWidth at 4, biHeight at 8
LYING_HEADERS = {
    "frame count": ([(b"strh", 32, 0xFFFFFFF0), (b"avih", 16, 0xFFFFFFF0)], "frames, more than"),
    "frame rate": ([(b"strh", 20, 1), (b"strh", 24, 2_000_000_000)], "frames per second"),
    "duration": ([(b"strh", 20, 1_000_000), (b"strh", 24, 1)], "duration of"),
    "frame size": ([(b"strf", 4, 60000), (b"strf", 8, 60000), (b"avih", 32, 60000), (b"avih", 36, 60000)], ""),
}


def test_absurd_header_values_are_refused_in_one_line(tmp_path):
    """Run in a child: decord given an AVI that claims 4 billion frames aborted the whole process
    (std::bad_alloc); PyAV silently returned the last frame N times."""
    data = _write_raw_avi(tmp_path / "raw.avi")
    paths = {}
    for name, (fields, _) in LYING_HEADERS.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.avi"
        paths[name].write_bytes(_patched(data, fields))
    backends = [p.values[0] for p in video_backends() if not p.marks]
    code = f"""
        import json, os
        from internvl_chat.errors import Cancelled, MediaError
        from internvl_chat.media.video import load_video, probe_video
        out = {{}}
        for backend in {backends!r}:
            os.environ["{BACKEND_ENV}"] = backend
            for name, path in {json.dumps({k: str(v) for k, v in paths.items()})}.items():
                for call in (load_video, probe_video):
                    try:
                        call(path)
                        out[f"{{name}} {{call.__name__}} {{backend}}"] = "accepted"
                    except MediaError as e:
                        out[f"{{name}} {{call.__name__}} {{backend}}"] = str(e)
        print(json.dumps(out))
    """
    got = _run_child(code, "")
    for backend in backends:
        for name, (_, words) in LYING_HEADERS.items():
            calls = ["load_video"] if name == "frame size" else ["load_video", "probe_video"]  # probing decodes nothing
            for call in calls:
                message = got[f"{name} {call} {backend}"]
                assert message != "accepted" and "\n" not in message, (name, call, backend, message)
                assert words in message and str(paths[name]) in message, (name, call, backend, message)


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("backend", video_backends())
def test_ctrl_c_while_decoding_returns_at_once_and_stops_the_decoder(tmp_path, monkeypatch, backend):
    """Ctrl-C reaches the caller while the decoder is still busy (here: held inside its first
    frame, as in a long FFmpeg call), and the decoder then stops before its next frame."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_numbered_video(tmp_path / "clip.mp4", 40, 30, "mpeg4")
    caller_interrupted = threading.Event()
    decoded = []
    real_frame_to_tile = media_video.frame_to_tile

    def frame_to_tile_then_ctrl_c(rgb, orientation, size):
        decoded.append(threading.current_thread())
        if len(decoded) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl-C
            caller_interrupted.wait(60)  # the decoder stays busy until the caller has returned
        return real_frame_to_tile(rgb, orientation, size)

    monkeypatch.setattr(media_video, "frame_to_tile", frame_to_tile_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_video(path, num_frames=8)
    finally:
        signal.signal(signal.SIGINT, previous)
    caller_interrupted.set()
    worker = decoded[0]
    assert worker is not threading.main_thread()  # the caller was free while the decoder was busy
    worker.join(60)
    assert not worker.is_alive()
    assert len(decoded) == 1  # stopped before decoding another frame


@pytest.mark.parametrize("backend", video_backends())
def test_a_cancel_event_set_while_decoding_stops_the_decoder_at_the_next_frame(tmp_path, monkeypatch, backend):
    """`serve` passes a request's cancel event: set (the client left), the caller gets Cancelled
    and the decoder decodes no further frame."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    path = write_numbered_video(tmp_path / "clip.mp4", 40, 30, "mpeg4")
    cancel, decoded = threading.Event(), []
    real_frame_to_tile = media_video.frame_to_tile

    def frame_to_tile_then_cancel(rgb, orientation, size):
        decoded.append(threading.current_thread())
        cancel.set()
        return real_frame_to_tile(rgb, orientation, size)

    monkeypatch.setattr(media_video, "frame_to_tile", frame_to_tile_then_cancel)
    with pytest.raises(Cancelled):
        load_video(path, num_frames=8, cancel=cancel)
    decoded[0].join(60)
    assert not decoded[0].is_alive() and len(decoded) == 1


# ---------------------------------------------------------------- damaged files


@pytest.mark.parametrize("backend", video_backends())
def test_damaged_videos_give_frames_or_one_line(tmp_path, monkeypatch, capfd, backend):
    """Bytes flipped or cut anywhere: a result or one MediaError line; nothing on stderr."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    clean = write_numbered_video(tmp_path / "clean.avi", 60, 30, "mpeg4", gop=12)
    data = clean.read_bytes()
    rng = random.Random(7)
    capfd.readouterr()
    outcomes = []
    for k in range(8):
        damaged = bytearray(data)
        for _ in range(25):
            at = rng.randrange(len(damaged) // 10, len(damaged))
            damaged[at] ^= 0xFF
        if k % 2:
            damaged = damaged[: rng.randrange(len(damaged) // 5, len(damaged))]
        path = tmp_path / f"damaged{k}.avi"
        path.write_bytes(bytes(damaged))
        try:
            result = load_video(path, num_frames=6)
            assert tuple(result.pixel_values.shape) == (6, 3, 448, 448)
            outcomes.append("frames")
        except MediaError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes.append("refused")
    # decord's FFmpeg reports damaged macroblocks on stderr unless silenced
    assert capfd.readouterr().err == "", outcomes


def _write_tiny_mov(path: Path, **options: str) -> Path:
    """A MOV of four 2×2 raw frames (`options`: the muxer's, e.g. movflags)."""
    import av
    import numpy as np

    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("rawvideo", rate=30)
        stream.width = stream.height = 2
        stream.pix_fmt = "rgb24"
        for number in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((2, 2, 3), number * 50, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_an_mp4_declaring_millions_of_fixed_size_frames_it_cannot_hold_is_refused_before_ffmpeg_opens_it(tmp_path):
    """One stsz entry (a fixed sample size and a count) and one stts and stsc entry can declare any
    number of frames: FFmpeg builds a ~35-byte index entry for each as it opens the file, before any
    count is checked (a 764-byte MOV of 20 million frames took 700 MB, ~178 million allowed)."""
    path = _write_tiny_mov(tmp_path / "raw.mov")
    assert load_video(path, num_frames=4).num_total_frames == 4  # as written: fine
    data = bytearray(path.read_bytes())
    for box, offset in ((b"stts", 8), (b"stsz", 8), (b"stsc", 12)):  # counts of the one entry each holds
        at = data.index(box)
        assert struct.unpack_from(">I", data, at + 4 + offset)[0] == 4, box
        struct.pack_into(">I", data, at + 4 + offset, 2_000_000)
    path.write_bytes(bytes(data))
    for call in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            call(path)
        assert str(err.value) == (f"{path} declares 2,000,000 frames (or samples) of 12 bytes, more than its "
                                  f"{len(data):,} bytes hold; the file is damaged or not a real video")  # fmt: skip


def test_a_fragmented_mp4_declaring_millions_of_frames_it_cannot_hold_is_refused_before_ffmpeg_opens_it(tmp_path):
    """A fragment's trun box without per-sample sizes declares any number of frames in 4 bytes, and
    FFmpeg indexes each as it opens the file (a 1,300-byte MOV of 20 million: 942 MB to probe)."""
    path = _write_tiny_mov(tmp_path / "fragments.mov", movflags="frag_keyframe+empty_moov+default_base_moof")
    assert load_video(path, num_frames=4).num_total_frames == 4  # as written: fine
    data = bytearray(path.read_bytes())
    at = data.index(b"trun")
    assert struct.unpack_from(">I", data, at + 8)[0] == 1  # the first fragment's sample count
    struct.pack_into(">I", data, at + 8, 2_000_000)
    path.write_bytes(bytes(data))
    for call in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            call(path)
        assert str(err.value) == (f"{path} declares 2,000,003 frames (or samples), more than its {len(data):,} bytes hold; "
                                  "the file is damaged or not a real video")  # fmt: skip


def _with_a_box_twice(data: bytes, kind: bytes) -> bytes:
    """An MP4 (its moov after its frames, so no chunk offset moves) with its first `kind` box
    written twice in a row; the boxes that hold it grow by its size."""
    at = data.index(kind) - 4
    size = struct.unpack_from(">I", data, at)[0]
    out = bytearray(data[:at] + data[at : at + size] + data[at:])
    for holder in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
        start = out.index(holder) - 4
        assert start < at
        struct.pack_into(">I", out, start, struct.unpack_from(">I", out, start)[0] + size)
    return bytes(out)


@pytest.mark.parametrize("backend", video_backends())
def test_an_mp4_with_a_duplicated_stts_box_is_damaged_not_out_of_memory(tmp_path, monkeypatch, backend):
    """Found by fuzzing: FFmpeg (7.1 on) answers a second stts box in a track with ENOMEM as it opens
    the file, and the attach said 'cannot read video … (Cannot allocate memory)'."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    made = write_numbered_video(tmp_path / "made.mp4", 20, 10)
    data = made.read_bytes()
    assert data.index(b"mdat") < data.index(b"moov")
    path = tmp_path / "twice.mp4"
    path.write_bytes(_with_a_box_twice(data, b"stts"))
    message = (f"cannot read video {path}: its header is invalid (FFmpeg cannot parse it); "
               "the file is damaged: use an undamaged copy")  # fmt: skip
    for call in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            call(path)
        assert str(err.value) == message


def test_ctrl_c_that_arrives_while_the_decoder_starts_stops_it_too(monkeypatch):
    """A Ctrl-C sent while the decoding thread starts is raised in the caller as the thread's
    signal mask is lifted (threads.start_worker): the thread, already running, was left to decode
    every frame (seen under load as the Ctrl-C test above decoding 8 frames, not 1)."""
    from internvl_chat.media import video_worker

    real_start = video_worker.start_worker
    released, seen = threading.Event(), []

    def start_then_ctrl_c(target, name):
        real_start(target, name)
        raise KeyboardInterrupt  # where the pending SIGINT is handled

    def work(stop):
        released.wait(60)
        seen.append(stop.is_set())  # what the worker sees before its next frame

    monkeypatch.setattr(video_worker, "start_worker", start_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        video_worker.interruptible(work)
    released.set()
    for thread in [t for t in threading.enumerate() if t.name == "video-decode"]:
        thread.join(60)
    assert seen == [True]
