"""The command handler shared by the REPL and --script, in process, against the tiny checkpoint.

Expected numbers are computed here by hand or from the prompt template (not from app.py): tile
counts of known image sizes, token counts of turns, percentages of the context.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from internvl_chat.chat.session import Session
from internvl_chat.chat.template import MediaSpec
from internvl_chat.errors import ContextOverflowError, EndedBySignal, GenerationError
from internvl_chat.media.video import load_video
from internvl_chat.settings import load_settings
from internvl_chat.ui.answer_text import AnswerCleaner, sanitize
from internvl_chat.ui.app import EXIT, ERROR, OK, App
from internvl_chat.ui.commands import block_is_open, unwrap_block
from internvl_chat.chat.sampling import params_from_settings as sampling_params
from media_helpers import cut_at_frame, faststart_copy, textured_rgb, write_late_start_video, write_numbered_video
from app_helpers import ChunkedAnswers, _Turn, make_app, output

MAX_CONTEXT = 2048  # the context conftest's `loaded` fixture gives the model
TOKENS_PER_TILE = 256


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("app_media")
    for name, seed in (("small.png", 5), ("small2.png", 6), ("small3.png", 7)):
        Image.fromarray(textured_rgb(900, 450, seed=seed)).save(d / name)  # 2×1 grid + thumbnail = 3 tiles
    Image.fromarray(textured_rgb(448, 448, seed=8)).save(d / "square.png")  # 1 tile, no thumbnail
    write_numbered_video(d / "clip.mp4", num_frames=30, fps=10)  # 3.0 s
    # a PNG whose header is fine (so measuring works) but whose pixel data is garbage
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b""))
    return d


def first_turn_len(app: App, text: str, specs=()) -> int:
    return len(app.session.builder.first_turn(text, list(specs)))


def media_len(app: App, spec: MediaSpec) -> int:
    b = app.session.builder
    return len(b.first_turn("", [spec])) - len(b.first_turn("", []))


def percent(fraction: float) -> int:
    return int(fraction * 100 + 0.5)


# --- pure helpers -------------------------------------------------------------------------------


def test_sanitize_removes_terminal_controls_but_keeps_text():
    assert sanitize("a\x1b[31mb\x07\tc\n\x9bd 中文") == "a[31mb\tc\nd 中文"


# (the answer's deltas, as the tokenizer may split them; the text shown): a lone \r is a line break
# (it was dropped, running "a" and "b" together), \r\n one line break even when split over two deltas
CARRIAGE_RETURNS = [
    (["a\r", "\nb"], "a\nb"),
    (["a\r", "b"], "a\nb"),
    (["a\r"], "a\n"),
    (["a\r\r\nb"], "a\n\nb"),
    (["a\r", "", "\r", "\n", "b\r\n"], "a\n\nb\n"),
]


@pytest.mark.parametrize("chunks, shown", CARRIAGE_RETURNS)
def test_a_carriage_return_in_an_answer_is_a_line_break_as_it_streams_and_in_the_export(chunks, shown, tmp_path):
    settings = load_settings(os.devnull, env={}, overrides={"ui.stats": False})
    out = io.StringIO()
    app = App(ChunkedAnswers(chunks), settings, Console(file=out, width=80, color_system=None), cwd=tmp_path)
    assert app.handle_line("Go.") == OK
    assert out.getvalue() == shown.rstrip("\n") + "\n"  # a pipe: the raw text, its line ended
    assert app.session.turns[0].answer_text == "".join(chunks)  # stored as generated
    assert app.handle_line("/export talk.md") == OK
    assert "## Assistant\n\n" + shown + "\n" in (tmp_path / "talk.md").read_text()


@pytest.mark.parametrize("chunks, shown", CARRIAGE_RETURNS)
def test_a_carriage_return_in_markdown_shows_as_a_newline_would(chunks, shown, tmp_path):
    def markdown(*answer: list[str]) -> str:
        out = io.StringIO()
        console = Console(file=out, width=80, color_system=None, force_terminal=True, force_interactive=False)
        app = App(ChunkedAnswers(*answer), load_settings(os.devnull, env={}, overrides={"ui.stats": False}), console,
                  cwd=tmp_path)  # fmt: skip
        for _ in answer:
            assert app.handle_line("Go.") == OK
        return out.getvalue()

    assert markdown(chunks) == markdown([shown])
    assert markdown(chunks, ["x\r", "y"]) == markdown([shown], ["x\ny"])  # nothing held over into the next answer


class _TerminalGone(io.StringIO):
    """A terminal that fails every write once `gone` is set (closed, hung up: EIO)."""

    gone = False
    failed = 0

    def write(self, text: str) -> int:
        if self.gone:  # the first failure says why; later writes find the file closed
            self.failed += 1
            raise OSError(5, "Input/output error") if self.failed == 1 else OSError(9, "Bad file descriptor")
        return super().write(text)


class _GoesAway(ChunkedAnswers):
    """Answers, then takes the terminal away before the answer's end comes."""

    def __init__(self, out: _TerminalGone, *answers: list[str]) -> None:
        super().__init__(*answers)
        self.out = out

    def ask(self, text, media=(), params=None, cancel=None):
        events = super().ask(text, media, params, cancel)
        for event in events:
            if event["finish_reason"] is not None:
                self.out.gone = True
            yield event


def test_an_answer_whose_last_feed_fails_still_finishes_its_stream(monkeypatch, tmp_path):
    """The answer's last piece (a held `\\r`, fed as the stream ended) failed to draw, the terminal
    gone: end_stream raised before the renderer's finish(), which was skipped, so the live tail's
    drawer thread (and its Ctrl-Z hook) stayed. finish() now always runs, and the error reported
    is the first write's, not a later one's."""
    from internvl_chat.ui import app as app_module
    from internvl_chat.ui import render, suspend

    monkeypatch.setattr(render, "time", type("Clock", (), {"monotonic": staticmethod(lambda: 1000.0)}))
    monkeypatch.setattr(render, "IDLE_S", 600.0)  # the drawer never ends of itself during the test
    streams, errors = [], []
    choose = app_module.choose_stream

    def recorded(*args, **kwargs):
        streams.append(choose(*args, **kwargs))
        # a throttled tail is drawn late only by finish(): a late draw by the drawer thread after
        # the terminal went (the app's thread descheduled a 15th of a second on a busy machine)
        # took the first failed write, the app's error then a later one's "Bad file descriptor"
        streams[-1].refresh_interval_s = 600.0
        return streams[-1]

    monkeypatch.setattr(app_module, "choose_stream", recorded)
    out = _TerminalGone()
    console = Console(file=out, width=80, height=20, color_system=None, force_terminal=True, force_interactive=True)
    app = App(_GoesAway(out, ["Hello", " there.\n", "\r"]), load_settings(os.devnull, env={},
              overrides={"ui.stats": False}), console, cwd=tmp_path)  # fmt: skip
    monkeypatch.setattr(app, "error", errors.append)
    assert app.handle_line("Go.") == ERROR
    stream = streams[0]
    assert isinstance(stream, render.MarkdownStream) and stream._finished
    drawer = stream._drawer
    if drawer is not None:
        drawer.join(30)
        assert not drawer.is_alive()
    assert suspend._open == []  # the live tail's Ctrl-Z hook closed: the handlers put back
    assert len(errors) == 1 and "Input/output error" in errors[0]


class _BreaksOff(ChunkedAnswers):
    """Answers with text that ends in a held `\\r`, then fails (a model's error mid-answer)."""

    def ask(self, text, media=(), params=None, cancel=None):
        yield {"text": "Hello\r", "finish_reason": None}
        raise GenerationError("the model failed")


class _SignalOnLastPiece:
    """A renderer whose feed of the answer's last piece (the held `\\r`) meets SIGTERM (cli.py's
    handler raises EndedBySignal there, and ignores the signal from then on)."""

    def __init__(self) -> None:
        self.finished = False

    def feed(self, delta: str) -> None:
        if "\n" in delta:
            raise EndedBySignal(signal.SIGTERM)

    def finish(self) -> str:
        self.finished = True
        return ""


def _script_app_rendering_with(stream, conv, monkeypatch, tmp_path) -> App:
    """A non-interactive (--script) app over `conv` whose answers `stream` renders, stats off."""
    from internvl_chat.ui import app as app_module

    monkeypatch.setattr(app_module, "choose_stream", lambda *args, **kwargs: stream)
    return App(conv, load_settings(os.devnull, env={}, overrides={"ui.stats": False}),
               Console(file=io.StringIO(), width=80, color_system=None), interactive=False, cwd=tmp_path)  # fmt: skip


def test_a_stop_signal_that_lands_as_a_failed_answer_ends_is_not_dropped(monkeypatch, tmp_path):
    """SIGTERM (or a script's Ctrl-C) raised while the last piece of an answer that failed was
    printed was dropped for the answer's error: a --script went on to its next line with SIGTERM
    ignored from then on. The signal ends the run; only an error (an Exception) gives way to the first."""
    stream = _SignalOnLastPiece()
    app = _script_app_rendering_with(stream, _BreaksOff(), monkeypatch, tmp_path)
    with pytest.raises(EndedBySignal):
        app.handle_line("Go.")
    assert stream.finished


class _InterruptedAfterPiece(ChunkedAnswers):
    """Answers with text that ends in a held `\\r`, then Ctrl-C lands between two events."""

    def ask(self, text, media=(), params=None, cancel=None):
        yield {"text": "Hello\r", "finish_reason": None}
        raise KeyboardInterrupt


class _PipeGoneOnLastPiece(_SignalOnLastPiece):
    """A renderer whose feed of the answer's last piece finds its reader gone (EPIPE)."""

    def feed(self, delta: str) -> None:
        if "\n" in delta:
            raise BrokenPipeError(32, "Broken pipe")


def test_a_ctrl_c_in_a_script_is_not_replaced_by_a_failed_write_of_the_answer_s_end(monkeypatch, tmp_path):
    """Ctrl-C between two events of a --script's answer: the held last piece, printed as the
    stream ended, failed (its reader gone), and that OSError replaced the KeyboardInterrupt: the
    app said "cannot use: Broken pipe" and went on to the script's next line. Ctrl-C ends it."""
    stream = _PipeGoneOnLastPiece()
    app = _script_app_rendering_with(stream, _InterruptedAfterPiece(), monkeypatch, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        app.handle_line("Go.")
    assert stream.finished


def test_the_cleaner_holds_a_last_carriage_return_until_the_next_delta():
    clean = AnswerCleaner()
    assert clean.feed("a\r") == "a"  # \r or \r\n: not known yet
    assert clean.feed("\n") == "\n" and clean.finish() == ""
    assert clean.feed("b\r") == "b" and clean.feed("") == "" and clean.finish() == "\n"
    assert clean.finish() == ""


def test_sanitize_shows_bidi_overrides_in_an_answer():
    """An answer cannot reorder what the terminal shows (Trojan Source): embedding, override and
    isolate controls are shown as escapes; right-to-left text, its marks and emoji joiners stay."""
    hostile = "run rm -rf ~/\u202e#gnp.tac\u202c and \u2067x\u2069 \u202a\u202b\u202d\u2066\u2068"
    assert sanitize(hostile) == ("run rm -rf ~/\\u202e#gnp.tac\\u202c and \\u2067x\\u2069 "
                                 "\\u202a\\u202b\\u202d\\u2066\\u2068")  # fmt: skip
    assert sanitize("שלום\u200f עולם 👩\u200d💻") == "שלום\u200f עולם 👩\u200d💻"


def test_triple_quote_blocks():
    assert unwrap_block('"""\nline 1\nline 2\n"""') == "line 1\nline 2"
    assert unwrap_block('"""one line"""') == "one line"
    assert unwrap_block("plain text") is None
    assert block_is_open('"""') and block_is_open('"""\nabc') and not block_is_open('"""\nabc\n"""')
    assert not block_is_open("abc")


# --- attachments --------------------------------------------------------------------------------


def test_an_animation_or_document_is_said_to_be_used_by_its_first_picture(loaded, tmp_path):
    """An animated GIF or a multi-page TIFF went to the model as its first picture with nothing said:
    a question about what happens in it, or about the document, was answered from one picture."""
    frames = [Image.fromarray(textured_rgb(448, 448, seed=seed)) for seed in (1, 2)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "still.gif")
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "preview.tif", save_all=True, append_images=frames[1:], tiffinfo={254: 1})  # reduced resolution
    app, out = make_app(loaded, tmp_path)
    names = ("moving.gif", "still.gif", "pages.tif", "preview.tif")
    assert app.handle_line("/image " + " ".join(str(tmp_path / name) for name in names)) == OK
    moving, still, pages, preview = out.getvalue().strip().splitlines()
    assert moving.startswith("+ image moving.gif 448×448 (animated: only its first frame is used) →")
    assert pages.startswith("+ image pages.tif 448×448 (several pages: only its first is used) →")
    assert "(" not in still and "(" not in preview


def test_media_lists_an_animation_from_what_was_read_as_it_was_attached(loaded, tmp_path):
    """The note was read from the file again for every attach line and /media list (a JPEG's scans
    counted, a GIF's blocks walked each time): a file changed since then changed what /media said of
    the picture the message will send."""
    frames = [Image.fromarray(textured_rgb(448, 448, seed=seed)) for seed in (1, 2)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {tmp_path / 'moving.gif'}") == OK
    frames[0].save(tmp_path / "moving.gif")  # now a still GIF
    out.truncate(0), out.seek(0)
    assert app.handle_line("/media") == OK
    assert "moving.gif 448×448 (animated: only its first frame is used)" in out.getvalue()


def test_a_gif_damaged_after_the_frame_it_is_used_by_is_attached(loaded, tmp_path):
    """Looking for a second frame met the damage after the first (IndexError): /image failed."""
    out = io.BytesIO()
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(out, "GIF")
    (tmp_path / "cut.gif").write_bytes(out.getvalue()[:-1] + b"!\xf9\x01\x01\x00")  # a frame's control block, cut
    app, printed = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {tmp_path / 'cut.gif'}") == OK
    assert printed.getvalue().startswith("+ image cut.gif 448×448 →"), printed.getvalue()


def test_attach_prints_cost_before_decoding(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {media / 'small.png'}") == OK
    tokens = media_len(app, MediaSpec("image", 3))
    assert tokens == 3 * TOKENS_PER_TILE + 3  # <img> + 768 × <IMG_CONTEXT> + </img> + "\n" (one token here)
    pct = percent(first_turn_len(app, "", [MediaSpec("image", 3)]) / MAX_CONTEXT)
    assert out.getvalue().strip() == f"+ image small.png 900×450 → 3 tiles · {tokens:,} tokens · context {pct} %"
    assert app.pending[0].pixel_values is None  # measured, not decoded

    app.handle_line(f"/video {media / 'clip.mp4'} --frames 2")
    video_tokens = media_len(app, MediaSpec("video", 2))
    assert f"+ video clip.mp4 2 frames of 3.0 s → {video_tokens:,} tokens" in out.getvalue()
    assert [m.kind for m in app.pending] == ["image", "video"]


def test_a_range_past_the_end_of_the_video_shows_and_saves_the_range_used(loaded, media, tmp_path):
    """`--range 2-1000` on a 3 s clip samples up to the last frame: the attach line, /media and the
    session file say 2–3 s, not 2–1000 s, and the frames are those of 2–3 s."""
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {media / 'clip.mp4'} --frames 2 --range 2-1000") == OK
    said = output(out)
    assert "clip.mp4 ends at 3 s, so the range ends there" in said
    assert "+ video clip.mp4 2 frames from 2–3 s →" in said and "1000" not in said
    app.handle_line("/media")
    assert "2 frames from 2–3 s" in output(out)
    assert app.handle_line("What happens?") == OK
    app.handle_line(f"/save {tmp_path / 'clip.json'}")
    saved = json.loads((tmp_path / "clip.json").read_text())
    assert [m["range"] for msg in saved["messages"] for m in msg.get("media", [])] == [[2, 3.0]]
    clamped = load_video(media / "clip.mp4", 2, 2, 1000)
    assert torch.equal(app.session.turns[0].features, loaded.model.encode_images(clamped.pixel_values))
    assert clamped.indices == load_video(media / "clip.mp4", 2, 2, 3.0).indices


def test_a_range_past_the_end_of_a_video_that_cannot_be_attached_says_only_why(loaded, media, tmp_path):
    """The note that the range ends at the video's end came before the attach was checked: a video
    too long for the context printed it and then the error, two outcomes for one line. Now the
    note follows the attach line, and a refused video gets its error alone."""
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {media / 'clip.mp4'} --frames 30 --range 1-1000") == ERROR
    said = output(out).strip()
    assert "cannot attach clip.mp4" in said and "\n" not in said and "ends there" not in said
    assert app.handle_line(f"/video {media / 'clip.mp4'} --frames 2 --range 1-1000") == OK
    attached, note = output(out).strip().split("\n")
    assert attached.startswith("+ video clip.mp4 2 frames from 1–3 s")
    assert note == "clip.mp4 ends at 3 s, so the range ends there"


def test_an_mkv_whose_first_frame_comes_after_0_is_attached_with_the_length_of_its_frames(loaded, tmp_path):
    """Its header's duration is where its frames end (1.8 s for 0.8 s of frames from 1 s): the
    attach line said "of 1.8 s" and took a range from 1 s that decoding refused as the message was sent."""
    late = write_late_start_video(tmp_path / "late.mkv", 20, first_ms=1000)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {late} --frames 2 --range 1-1.5") == ERROR
    assert "the range starts at 1 s but late.mkv is only 0.80 s long; choose an earlier start" in output(out)
    assert app.handle_line(f"/video {late} --frames 2") == OK
    assert "+ video late.mkv 2 frames of 0.8 s → " in output(out)


def test_a_range_a_variable_rate_video_is_attached_with_is_sampled_as_the_message_is_sent(loaded, tmp_path):
    """20 frames in 1.36 s whose header says 25 fps: the attach line took 1–1.3 s of 1.36 s, and
    sending refused it as "past the end of the video (0.80 s)" (20 frames at 25 fps). A start past
    1.36 s is refused at attach, with that length."""
    times = [100 * number for number in range(10)] + [940 + 40 * number for number in range(10)]
    vfr = write_late_start_video(tmp_path / "vfr.mkv", 20, 0, times_ms=times)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {vfr} --frames 2 --range 1.4-2") == ERROR
    assert "the range starts at 1.4 s but vfr.mkv is only 1.36 s long; choose an earlier start" in output(out)
    assert app.handle_line(f"/video {vfr} --frames 2 --range 1-1.3") == OK
    assert "+ video vfr.mkv 2 frames from 1–1.3 s → " in output(out)
    assert app.handle_line("What happens?") == OK, output(out)
    assert "past the end" not in output(out)

def test_a_video_cut_short_is_said_once_at_attach_not_again_with_the_answer(loaded, media, tmp_path):
    """Its frames are sampled from the ones it holds (media/video.py). The attach line gives the
    length it holds, from its index (it gave the header's 3.0 s, and the cut was learnt only with
    the answer); the note decoding leaves (what was sampled) said it a second time, after the answer."""
    whole = faststart_copy(media / "clip.mp4", tmp_path / "whole.mp4")
    cut = cut_at_frame(whole, tmp_path / "cut.mp4", 10)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {cut} --frames 2 --range 2-3") == ERROR  # the length held
    assert "the range starts at 2 s but cut.mp4 is only 1.00 s long; choose an earlier start" in output(out)
    assert app.handle_line(f"/video {cut} --frames 2") == OK
    assert "+ video cut.mp4 2 frames of 1.0 s (cut short: it holds 10 of its 30 frames) → " in output(out)
    app.handle_line("/media")
    assert "2 frames of 1.0 s (cut short: it holds 10 of its 30 frames)" in output(out)
    assert app.handle_line("What happens?") == OK
    said = output(out)
    assert "cut short" not in said and "holds only" not in said, said
    assert app.handle_line("And then?") == OK
    assert "holds only" not in output(out)


def test_an_mkv_or_avi_cut_short_is_said_at_attach_and_how_much_it_holds_after_the_answer(loaded, tmp_path):
    """The attach line said nothing of an MKV, WebM or AVI cut short: the cut was found only as its
    frames were decoded. Its elements' headers tell that the file ends inside its frames (not how
    many it holds, which its header does not count): the attach line says it is cut short, the
    note after the answer, once, where its frames end. The length on the attach line is the one the
    frames it holds reach (an MKV's gave its header's 1.0 s: the blocks it holds whole tell)."""
    for name in ("clip.mkv", "clip.avi"):
        cut = cut_at_frame(write_numbered_video(tmp_path / name, 30), tmp_path / f"cut_{name}", 12)
        app, out = make_app(loaded, tmp_path)
        assert app.handle_line(f"/video {cut} --frames 2") == OK
        said = "2 frames of 0.4 s (cut short: the file ends before its last frame) → "
        assert f"+ video {cut.name} {said}" in output(out)
        app.handle_line("/media")
        assert said in output(out)
        assert app.handle_line("What happens?") == OK
        assert output(out).count(f"{cut} ends at 0.4 s of the 1.0 s its header lists (12 frames)") == 1, name
        assert app.handle_line("And then?") == OK
        assert " ends at " not in output(out)
        assert app.handle_line(f"/video {tmp_path / name} --frames 2") == OK
        assert "cut short" not in output(out)  # the whole file


def test_a_cut_video_attached_twice_is_noted_once_with_the_answer(loaded, media, tmp_path, monkeypatch):
    """Where the attach line could not tell (no index to read: the cut is found while decoding),
    the note comes with the answer: once, though the video be attached twice (other frames)."""
    from internvl_chat.media import video_header

    whole = faststart_copy(media / "clip.mp4", tmp_path / "whole.mp4")
    cut = cut_at_frame(whole, tmp_path / "cut.mp4", 10)
    monkeypatch.setattr(video_header, "frames_lost", lambda stream, path, hides: 0)  # PyAV without index_entries
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/video {cut} --frames 2") == OK and app.handle_line(f"/video {cut} --frames 3") == OK
    assert "cut short" not in output(out)  # not known yet
    assert app.handle_line("What happens?") == OK
    assert output(out).count(f"{cut} holds only 10 of the 30 frames its header lists") == 1


def test_warns_at_80_percent_and_refuses_past_the_budget(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    image = MediaSpec("image", 3)
    app.handle_line(f"/image {media / 'small.png'}")
    assert "warning" not in out.getvalue()
    app.handle_line(f"/image {media / 'small2.png'}")
    two = first_turn_len(app, "", [image, image])
    assert two / MAX_CONTEXT >= 0.8 and two + 8 <= MAX_CONTEXT  # the case this test is about
    assert f"context {percent(two / MAX_CONTEXT)} %" in out.getvalue()
    assert "warning: the context will be" in out.getvalue()
    assert "/clear" not in out.getvalue()  # no turn yet: /clear would free nothing (it keeps the attachments)

    assert app.handle_line(f"/image {media / 'small3.png'}") == ERROR
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("error: cannot attach small3.png:") and "--max-context" in last
    assert len(app.pending) == 2  # nothing half-attached

    # a thousand at once (`/image *.png`): the reason in one short line, not every name
    assert app.handle_line("/image " + " ".join(f"{media / 'small3.png'}" for _ in range(1000))) == ERROR
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("error: cannot attach small3.png, small3.png, small3.png and 997 more: ") and len(last) < 400
    assert len(app.pending) == 2


def test_media_list_and_drop(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/media")
    assert "nothing attached" in out.getvalue()
    app.handle_line(f"/image {media / 'small.png'} {media / 'square.png'}")
    output(out)  # what came before is not under test
    app.handle_line("/media")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("1. image small.png 900×450 → 3 tiles")
    assert lines[1].startswith(f"2. image square.png 448×448 → 1 tile · {media_len(app, MediaSpec('image', 1)):,} tokens")
    output(out)
    assert app.handle_line("/drop 3") == ERROR
    assert output(out) == "error: there is no attachment 3: 2 are attached (/media lists them)\n"
    assert app.handle_line("/drop 1") == OK
    assert [m.path.name for m in app.pending] == ["square.png"]
    output(out)
    assert app.handle_line("/drop 2") == ERROR  # it said "/media lists the 1 attached"
    assert output(out) == "error: there is no attachment 2: only 1 is attached (/media lists it)\n"
    # the same picture again (Up, Enter): attached, as asked, and said, since it doubles the cost
    output(out)
    assert app.handle_line(f"/image {media / 'square.png'}") == OK and len(app.pending) == 2
    assert output(out).endswith("warning: square.png attached more than once; /media lists the attachments, "
                                "/drop N removes one\n")
    assert app.handle_line(f"/image {media / 'small.png'}") == OK and "warning" not in output(out)


def damaged_after_attaching(app: App, media: Path, folder: Path) -> Path:
    """A picture attached whole, then overwritten with one whose pixel data is garbage: the damage
    /image cannot see, which only sending the message finds."""
    path = folder / "changed.png"
    path.write_bytes((media / "square.png").read_bytes())
    assert app.handle_line(f"/image {path}") == OK
    path.write_bytes((media / "corrupt.png").read_bytes())
    return path


def test_missing_and_corrupt_files_are_errors_and_the_conversation_survives(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert len(app.session.turns) == 1
    assert app.handle_line("/image /nonexistent/cat.png") == ERROR
    assert "error: " in out.getvalue() and "does not exist" in out.getvalue()
    damaged_after_attaching(app, media, tmp_path)
    ids_before = list(app.session.ids)
    assert app.handle_line("What is it?") == ERROR
    assert "/drop N" in out.getvalue().strip().splitlines()[-1]
    assert len(app.session.turns) == 1 and app.session.ids == ids_before and len(app.pending) == 1
    app.handle_line("/drop 1")
    assert app.handle_line("Then just talk.") == OK
    assert len(app.session.turns) == 2


def cut_in_half(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def as_jpeg(source: Path, path: Path) -> Path:
    with Image.open(source) as image:
        image.save(path, "JPEG")
    return path


def jpeg_with_garbage_after_its_header(source: Path, path: Path) -> Path:
    """The header and the start of the scan intact, then bytes that are no JPEG data."""
    data = as_jpeg(source, path).read_bytes()
    start = data.index(b"\xff\xda") + 20
    path.write_bytes(data[:start] + bytes(range(256)) * 20)
    return path


DAMAGED_IMAGES = {
    "png cut in half": lambda media, folder: cut_in_half(media / "small.png", folder / "cut.png"),
    "jpeg cut in half": lambda media, folder: cut_in_half(as_jpeg(media / "small.png", folder / "whole.jpg"), folder / "cut.jpg"),
    "jpeg with garbage": lambda media, folder: jpeg_with_garbage_after_its_header(media / "small.png", folder / "bad.jpg"),
    "png with garbage pixel data": lambda media, folder: media / "corrupt.png",
}


@pytest.mark.parametrize("damage", DAMAGED_IMAGES)
def test_a_damaged_image_is_refused_at_image_with_nothing_attached(loaded, media, tmp_path, damage):
    """The header alone passed /image, and the message sent with the picture failed as it was decoded."""
    path = DAMAGED_IMAGES[damage](media, tmp_path)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("Hello.") == OK
    ids_before = list(app.session.ids)
    output(out)
    assert app.handle_line(f"/image {path}") == ERROR
    printed = output(out)
    assert printed.startswith("error: cannot decode ") and "truncated or corrupt" in printed and "re-export" in printed
    assert printed.count("\n") == 1, printed  # one line
    assert app.pending == [] and len(app.session.turns) == 1 and app.session.ids == ids_before
    # with a good picture before it in the same command: neither is attached
    assert app.handle_line(f"/image {media / 'square.png'} {path}") == ERROR and app.pending == []
    assert app.handle_line(f"/image {media / 'square.png'}") == OK and len(app.pending) == 1  # a valid one still attaches
    assert app.handle_line("What is it?") == OK and len(app.session.turns) == 2


def test_a_damaged_image_named_in_a_message_fails_it_before_it_is_sent(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    path = cut_in_half(media / "small.png", tmp_path / "cut.png")
    assert app.handle_line(f"What is in {path}?") == ERROR
    printed = output(out)  # no "+ image cut.png" line before it: it was never attached
    assert printed.startswith("error: cannot decode ") and printed.count("\n") == 1 and "truncated or corrupt" in printed
    assert app.pending == [] and app.session.turns == [] and app.failed_message == f"What is in {path}?"


def test_a_message_whose_image_does_not_decode_is_offered_back_for_the_next_prompt(loaded, media, tmp_path):
    """The pty walkthrough: the picture passed /image (it changed after), the message failed as it
    was decoded, and the typed question was gone from the prompt (only Up found it)."""
    app, out = make_app(loaded, tmp_path)
    damaged_after_attaching(app, media, tmp_path)
    assert app.handle_line("What is it?") == ERROR
    assert app.failed_message == "What is it?"
    assert app.handle_line("/drop 5") == ERROR and app.failed_message is None  # a command is not given back
    # pasted with the command before it: that has run, only the message comes back, as typed
    assert app.handle_line(f"/image {media / 'square.png'}\n//etc is a folder\nand this?") == ERROR
    assert app.failed_message == "//etc is a folder\nand this?"
    assert app.handle_line('"""\nA block\n"""') == ERROR and app.failed_message == '"""\nA block\n"""'
    assert len(app.session.turns) == 0 and len(app.pending) == 2  # the pasted /image ran


class _Refusing(ChunkedAnswers):
    """Refuses a message that holds "long" before any answer, as a context too small does."""

    refuse = True

    def ask(self, text, media=(), params=None, cancel=None):
        if self.refuse and "long" in text:
            raise ContextOverflowError("the message is too long for the context")
        return super().ask(text, media, params, cancel)


def test_a_message_refused_as_too_long_is_offered_back_and_a_sent_one_is_not(tmp_path):
    out = io.StringIO()
    app = App(_Refusing(["Fine."]), load_settings(os.devnull, env={}, overrides={"ui.stats": False}),
              Console(file=out, width=200, color_system=None), cwd=tmp_path)  # fmt: skip
    assert app.handle_line("A very long message") == ERROR and app.failed_message == "A very long message"
    assert "error: the message is too long" in output(out)
    assert app.handle_line("A short one") == OK and app.failed_message is None
    assert app.handle_message("long again") == ERROR and app.failed_message == "long again"  # -I's prompt, as typed


@pytest.mark.parametrize("text", ["/etc is long", "  /image long.png\n/drop 1", '"""long"""', '"""\nlong\n"""', "\n/long",
                                  "\ufeff/etc is long"])
def test_the_prompt_of_dash_I_refused_is_offered_back_in_a_form_that_sends_the_same_text(tmp_path, text):
    # -I -p TEXT sends TEXT as a message even when it starts with a slash or a block: given back
    # as it is, Enter ran it as the command /etc (or sent the inside of the block)
    refusing = _Refusing(["Fine."])
    app = App(refusing, load_settings(os.devnull, env={}, overrides={"ui.stats": False}),
              Console(file=io.StringIO(), width=200, color_system=None), cwd=tmp_path)  # fmt: skip
    assert app.handle_message(text) == ERROR and app.failed_message is not None
    refusing.refuse = False
    assert app.handle_line(app.failed_message) == OK
    assert [turn.user_text for turn in refusing.turns] == [text.strip()]


def test_an_image_path_typed_with_bare_spaces_or_a_question_after_it_is_said_plainly(loaded, media, tmp_path):
    # `/image ~/My Pics/cat 1.png` is three words: the error was "…/My does not exist", nothing
    # said that the words together name a file
    (tmp_path / "My Pics").mkdir()
    (tmp_path / "My Pics" / "cat 1.png").write_bytes((media / "small.png").read_bytes())
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    assert app.handle_line("/image My Pics/cat 1.png") == ERROR
    assert output(out) == "error: My does not exist; a path with spaces goes in quotes: /image 'My Pics/cat 1.png'\n"
    assert app.pending == [] and len(app.session.turns) == 1
    assert app.handle_line("/image 'My Pics/cat 1.png'") == OK and len(app.pending) == 1
    # a question after the path: the word was said not to exist as an image, nothing said why
    assert app.handle_line("/image 'My Pics/cat 1.png' How many cats?") == ERROR
    assert output(out).endswith("error: How is not a file: /image takes only paths, so send the question as the next "
                                "message (or name the file in it)\n")
    assert len(app.pending) == 1 and len(app.session.turns) == 1


def test_image_takes_wildcards_as_a_shell_does(loaded, media, tmp_path):
    # `/image shots/*.png` said "image shots/*.png does not exist"
    shots = tmp_path / "my shots"
    shots.mkdir()
    for name in ("b.png", "a.png", "notes.txt"):
        (shots / name).write_bytes((media / "square.png").read_bytes())
    (shots / "[x].png").write_bytes((media / "square.png").read_bytes())  # a name that reads as a pattern
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert app.handle_line("/image my\\ shots/?.png") == OK
    assert [m.path.name for m in app.pending] == ["a.png", "b.png"]  # in name order, the text file left out
    assert app.handle_line("/image 'my shots/[x].png'") == OK
    assert app.pending[-1].path.name == "[x].png"  # the file itself
    assert app.handle_line("/drop 3") == OK and app.handle_line("/drop 2") == OK
    assert app.handle_line("/image 'my shots'/*") == OK
    assert [m.path.name for m in app.pending] == ["a.png", "[x].png", "a.png", "b.png"]
    output(out)
    assert app.handle_line("/image 'my shots/*.jpg'") == ERROR
    assert output(out) == "error: no image file matches my shots/*.jpg; check the pattern\n"
    assert len(app.pending) == 4 and len(app.session.turns) == 1


def test_a_damaged_file_among_several_says_that_none_was_attached(loaded, media, tmp_path):
    # only the damaged file was named: the others seemed attached, and the next message went without them
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "a.png").write_bytes((media / "square.png").read_bytes())
    (shots / "b.png").write_bytes(b"not a picture")
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/image shots/*.png") == ERROR
    assert output(out).startswith(f"error: none of the 2 images was attached: {shots / 'b.png'} is ")
    assert app.handle_line("/image shots/b.png") == ERROR  # one file: the error as it was
    assert output(out).startswith(f"error: {shots / 'b.png'} is ")
    assert app.pending == []


def test_an_image_pattern_over_a_big_folder_is_refused_before_any_file_is_read(loaded, tmp_path, monkeypatch):
    # each match was read and hashed before the context check: a pattern over a photo library
    # took minutes only to be refused
    import internvl_chat.ui.media_paths as media_paths

    folder = tmp_path / "library"
    folder.mkdir()
    for i in range(media_paths.MAX_PATTERN_MATCHES + 1):
        (folder / f"{i:04d}.png").write_bytes(b"not read")
    app, out = make_app(loaded, tmp_path)
    monkeypatch.setattr(app, "describe", lambda *a, **k: pytest.fail("a file was read"))
    assert app.handle_line("/image library/*.png") == ERROR
    assert output(out) == (f"error: library/*.png matches {media_paths.MAX_PATTERN_MATCHES + 1} images; /image attaches "
                           f"at most {media_paths.MAX_PATTERN_MATCHES} at once, so narrow the pattern\n")  # fmt: skip
    assert app.pending == []


def test_video_takes_wildcards_as_image_does(loaded, media, tmp_path):
    # `/video clips/*` said "clips/* does not exist" where `/image shots/*` attached the pictures
    clips = tmp_path / "my clips"
    clips.mkdir()
    for name in ("b.mp4", "a.mp4", "[x].mp4"):
        (clips / name).write_bytes((media / "clip.mp4").read_bytes())
    (clips / "still.png").write_bytes((media / "square.png").read_bytes())
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/video 'my clips'/* --frames 1") == OK
    assert [(m.kind, m.path.name) for m in app.pending] == [("video", "[x].mp4"), ("video", "a.mp4"), ("video", "b.mp4")]
    assert all(m.frames == 1 for m in app.pending)  # the options apply to each
    assert app.handle_line("/video 'my clips/[x].mp4' --frames 1") == OK
    assert [m.path.name for m in app.pending[3:]] == ["[x].mp4"]  # a file of that very name wins
    output(out)
    assert app.handle_line("/video 'my clips/*.mkv'") == ERROR
    assert output(out) == "error: no video file matches my clips/*.mkv; check the pattern\n"
    assert len(app.pending) == 4


def test_a_video_pattern_over_a_big_folder_is_refused_before_any_file_is_read(loaded, tmp_path, monkeypatch):
    import internvl_chat.ui.media_paths as media_paths

    (tmp_path / "clips").mkdir()
    for i in range(media_paths.MAX_PATTERN_MATCHES + 1):
        (tmp_path / "clips" / f"{i:04d}.mp4").write_bytes(b"not read")
    app, out = make_app(loaded, tmp_path)
    monkeypatch.setattr(app, "describe", lambda *a, **k: pytest.fail("a file was read"))
    assert app.handle_line("/video clips/*") == ERROR
    assert output(out) == (f"error: clips/* matches {media_paths.MAX_PATTERN_MATCHES + 1} videos; /video attaches "
                           f"at most {media_paths.MAX_PATTERN_MATCHES} at once, so narrow the pattern\n")  # fmt: skip


def test_an_image_or_video_flag_given_a_pattern_the_shell_left_expands_it(loaded, media, tmp_path):
    # `--image 'shots/*'` (quoted, or a pattern that matched nothing in the shell) said "does not exist"
    import argparse

    from internvl_chat.errors import UsageError
    from internvl_chat.ui.setup import media_from_flags

    for name in ("b.png", "a.png"):
        (tmp_path / name).write_bytes((media / "square.png").read_bytes())
    (tmp_path / "c.mp4").write_bytes((media / "clip.mp4").read_bytes())
    app, _ = make_app(loaded, tmp_path)
    flags = lambda image=(), video=(): argparse.Namespace(image=list(image), video=list(video), video_range=None)  # noqa: E731
    got = media_from_flags(app.session, flags([str(tmp_path / "*")], [str(tmp_path / "*")]), app.settings)
    assert [(m.kind, m.path.name) for m in got] == [("image", "a.png"), ("image", "b.png"), ("video", "c.mp4")]
    with pytest.raises(UsageError, match=r"^no image file matches .*/\*\.jpg; check the pattern$"):
        media_from_flags(app.session, flags([str(tmp_path / "*.jpg")]), app.settings)
    with pytest.raises(UsageError, match=r"^no video file matches .*/\?\.mkv; check the pattern$"):
        media_from_flags(app.session, flags(video=[str(tmp_path / "?.mkv")]), app.settings)


def test_pasted_lines_that_start_with_commands_run_one_by_one(loaded, media, tmp_path):
    # a paste of `/image cat.png` and a question was one /image command with the question as its
    # paths ("What is not a file"); `/set a 1` and `/set b 2` set a to "1\n/set b 2"
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {media / 'square.png'}\nWhat is it?\nSay it briefly.") == OK
    assert [(t.user_text, [m.path.name for m in t.media]) for t in app.session.turns] == [
        ("What is it?\nSay it briefly.", ["square.png"])]  # the text after the commands is one message
    assert app.handle_line("/set temperature 0.5\n/set top_p 0.9\n") == OK
    assert (app.session.params.temperature, app.session.params.top_p) == (0.5, 0.9)
    output(out)
    # a command that fails stops there, and says what was not run
    assert app.handle_line("/image nothing.png\nWhat?\nMore.") == ERROR
    assert output(out) == (f"error: image {tmp_path / 'nothing.png'} does not exist; check the path\n"
                           "(the 2 lines after it were not run)\n")  # fmt: skip
    assert app.handle_line("/imgae x.png\nWhat?") == ERROR
    assert output(out) == "error: unknown command /imgae; did you mean /image? (nothing of the 2 lines was run)\n"
    assert len(app.session.turns) == 1 and app.pending == []
    # the text of /system and of /set system.message may hold several lines
    assert app.handle_line("/set system.message Be\nbrief.") == OK and app.session.system_message == "Be\nbrief."
    assert app.handle_line("/system One\nTwo.") == OK and app.session.system_message == "One\nTwo."
    # a later line that is no command stops there too, and says it was not the first
    assert app.handle_line("/set temperature 0.4\n/imgae x.png\nWhat?") == ERROR
    assert output(out).endswith("did you mean /image? (it and the 1 line after it were not run)\n")
    assert app.session.params.temperature == 0.4


def test_a_paste_of_thousands_of_command_lines_runs_them_all(loaded, tmp_path):
    # each leading command line was a call deeper: 1,000 of them passed Python's recursion limit
    # and the RecursionError escaped the app
    app, out = make_app(loaded, tmp_path)
    lines = [f"/set temperature 0.{i % 9 + 1}" for i in range(3000)]
    assert app.handle_line("\n".join([*lines, "", "  ", "Hello."])) == OK
    assert app.session.params.temperature == 0.3  # the last of them: 2999 % 9 + 1
    assert [t.user_text for t in app.session.turns] == ["Hello."]


def test_a_path_with_a_nul_character_is_one_line_and_the_conversation_survives(loaded, tmp_path):
    # a script line (past its first 8 KiB) or a pasted line can hold NUL: /save, /export and a
    # message naming such a media path ended the app with "ValueError: embedded null byte"
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    for line in ("/save a\x00.json", "/export a\x00.md", "/image a\x00.png", "/load a\x00"):
        assert app.handle_line(line) == ERROR
        shown = output(out)
        assert shown.startswith("error: ") and shown.count("\n") == 1 and "\x00" not in shown
    assert app.handle_line("look at ./x\x00.png please") == OK
    assert len(app.session.turns) == 2 and list(tmp_path.iterdir()) == []


def test_a_long_paste_without_a_media_extension_is_not_searched_word_by_word(monkeypatch, tmp_path):
    # a pasted 15 MB log spent minutes splitting and testing words for media paths before the
    # context check refused it; without a media extension anywhere it cannot name a file
    import internvl_chat.ui.media_paths as media_paths
    import internvl_chat.ui.paths as paths_module

    def searched(*args, **kwargs):
        raise AssertionError("searched word by word")

    monkeypatch.setattr(media_paths, "split_words", searched)
    monkeypatch.setattr(paths_module, "_candidates", searched)
    text = "see /var/log/x.log  and ./notes.txt (png, mp4) " * 1000
    assert media_paths.take_media_paths(text, tmp_path, (tmp_path,)) == (text, [], [])
    (tmp_path / "cat.PNG").write_bytes(b"x")
    monkeypatch.undo()
    assert media_paths.take_media_paths("what is ./cat.PNG?", tmp_path) == ("what is?", [tmp_path / "cat.PNG"], [])


def test_the_first_words_of_a_path_with_a_space_are_not_said_missing_too(tmp_path):
    # `scan.png 2.png` was attached, and its first word `scan.png` also said not to exist: the
    # message, its question left after the path, was refused as only a missing path
    from internvl_chat.ui.media_paths import only_missing_paths, take_media_paths

    (tmp_path / "scan.png 2.png").write_bytes(b"x")
    text, found, missing = take_media_paths(f"{tmp_path}/scan.png 2.png describe")
    assert (text, found, missing) == ("describe", [tmp_path / "scan.png 2.png"], [])
    assert not only_missing_paths(text, missing)
    assert take_media_paths(f"{tmp_path}/scan.png 2.png {tmp_path}/gone.png")[2] == [tmp_path / "gone.png"]


def test_a_typed_media_path_that_is_no_file_is_said_not_to_be_attached(loaded, tmp_path):
    # a folder, a FIFO or a link to a device under a picture's name was left in the text silently
    (tmp_path / "album.png").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("Compare ./album.png, ./pipe.mp4, ./zero.jpg and ./gone.png.") == OK
    assert app.session.turns[0].media == [] and "./album.png" in app.session.turns[0].user_text
    said = [line for line in output(out).splitlines() if line.startswith("warning:")]
    assert said == [f"warning: {tmp_path / name} {why}, so it was not attached; check the path"
                    for name, why in (("album.png", "is not a file (a folder, a device or a pipe)"),
                                      ("pipe.mp4", "is not a file (a folder, a device or a pipe)"),
                                      ("zero.jpg", "is not a file (a folder, a device or a pipe)"),
                                      ("gone.png", "does not exist"))]  # fmt: skip


def test_a_message_that_is_only_a_missing_media_path_is_not_sent(loaded, tmp_path):
    # a mistyped path alone was sent: the model read "/data/cat.png" as the question
    app, out = make_app(loaded, tmp_path)
    for line in ("/data/cat.png", "./gone.png ./gone2.mp4"):
        assert app.handle_line(line) == ERROR
        assert app.session.turns == [] and app.failed_message == line  # the REPL offers it back
    assert output(out).splitlines() == [
        "error: /data/cat.png does not exist, so the message, only its path, was not sent; check the path",
        f"error: {tmp_path / 'gone.png'} does not exist, so the message, only its path (and 1 more path that "
        "names no file), was not sent; check the path",
    ]
    assert app.handle_line("What is in /data/cat.png?") == OK  # with words of its own it is a question
    assert len(app.session.turns) == 1


def test_a_symlink_loop_named_or_attached_ends_no_command(loaded, media, tmp_path):
    # Path.resolve raised RuntimeError on a symlink loop (Python 3.11): a message naming one, or
    # /image, a message and /export after an attached or sent picture became one, ended the run
    # with a traceback and the conversation was lost
    (tmp_path / "loop.png").symlink_to("loop.png")
    picture = tmp_path / "picture.png"
    picture.write_bytes((media / "square.png").read_bytes())
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("What is in ./loop.png?") == OK
    assert f"warning: {tmp_path / 'loop.png'} does not exist, so it was not attached" in output(out)
    assert app.handle_line(f"/image {picture}") == OK
    picture.unlink()
    picture.symlink_to("picture.png")  # the attached file is now a loop
    assert app.handle_line(f"/image {media / 'small.png'}") == OK
    assert app.handle_line(f"Compare them with {media / 'small2.png'}") in (OK, ERROR)  # the loop cannot be read
    output(out)
    app.pending.clear()
    assert app.handle_line("Hello.") == OK
    app.session.turns[-1].media.append(app.describe(media / "square.png", "image"))
    app.session.turns[-1].media[-1].path = picture  # a picture sent with the turn, now a loop
    assert app.handle_line(f"/export {tmp_path / 'chat.md'}") == OK
    assert str(picture) in (tmp_path / "chat.md").read_text()

def test_a_file_name_holding_a_line_break_completes_into_a_command_that_works(loaded, media, tmp_path):
    # Tab writes a line break in a file name escaped by a backslash; the line was cut there before
    # the command was read, so `/image` said "…/a\\ does not exist" for the name it had just offered
    from prompt_toolkit.document import Document

    from internvl_chat.ui.repl import ChatCompleter

    (tmp_path / "a\nb.png").write_bytes((media / "square.png").read_bytes())
    (completed,) = [c.text for c in ChatCompleter(tmp_path).get_completions(Document("/image ./a"), None)]
    assert completed == "./a\\\nb.png"
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {completed}\nWhat is it?") == OK, output(out)
    assert [m.path.name for m in app.session.turns[0].media] == ["a\nb.png"]
    assert app.session.turns[0].user_text == "What is it?"
    assert app.handle_line("Say \\\nhello.") == OK  # a message keeps its text as typed
    assert app.session.turns[1].user_text == "Say \\\nhello."

def test_a_message_naming_many_missing_pictures_warns_in_a_few_lines(loaded, tmp_path):
    # a pasted log naming hundreds of pictures of another machine printed a warning line for each
    app, out = make_app(loaded, tmp_path)
    paths = [f"/data/f{n}.png" for n in range(40)]
    assert app.handle_line("Why did these fail? " + " ".join(paths)) == OK
    said = [line for line in output(out).splitlines() if line.startswith("warning:")]
    assert said == [*(f"warning: {path} does not exist, so it was not attached; check the path" for path in paths[:5]),
                    "warning: 35 more paths of pictures or videos name no file, so they were not attached either"]

def test_unknown_command_gets_a_suggestion(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/imgae x.png") == ERROR
    assert out.getvalue().strip() == "error: unknown command /imgae; did you mean /image?"


# --- turns --------------------------------------------------------------------------------------


def test_message_takes_pending_media_and_context_adds_up(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("What is in the picture?")
    app.handle_line("And now?")
    session = app.session
    assert [len(t.media) for t in session.turns] == [1, 0] and app.pending == []
    assert "decode" in out.getvalue() and f"context {session.context_used:,}/{MAX_CONTEXT:,}" in out.getvalue()

    items = dict(app.session.context_items(app.pending))
    b = session.builder
    system = len(b.first_turn("", [])) - len(b.user_turn("", []))
    t1, t2 = session.turns
    assert items["system message"] == system
    turn1 = next(v for k, v in items.items() if k.startswith("turn 1:"))
    turn2 = next(v for k, v in items.items() if k.startswith("turn 2:"))
    assert turn1 == first_turn_len(app, "What is in the picture?", [MediaSpec("image", 3)]) - system + len(t1.answer_ids)
    assert turn2 == len(b.next_turn("And now?", [])) + len(t2.answer_ids)
    assert system + turn1 + turn2 == session.context_used
    assert items["reserved for the answer (max_new_tokens)"] == 8
    output(out)  # what came before is not under test
    app.handle_line("/context")
    assert out.getvalue().startswith(f"context: {session.context_used:,} of {MAX_CONTEXT:,} tokens used")


def test_context_says_when_the_next_question_cannot_fit(loaded, tmp_path):
    """/context's last line said "at most, after the next answer: 2,226 of 2,048 tokens held
    (109 %)": a number no cache holds, for a next question the app refuses whatever its text."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert app.handle_line(f"/set max_new_tokens {MAX_CONTEXT - 4}") == OK
    planned = sum(tokens for _, tokens in app.session.context_items([]))
    assert planned > MAX_CONTEXT
    output(out)
    assert app.handle_line("/context") == OK
    shown = out.getvalue()
    assert f"of {MAX_CONTEXT:,} tokens held" not in shown
    assert (f"the next question and its answer need more than {planned:,} tokens, over the {MAX_CONTEXT:,}-token "
            "context; /undo or /clear make room, or /set max_new_tokens N with a smaller N") in " ".join(shown.split())
    assert app.handle_line("Another question.") == ERROR  # as it says
    app.handle_line("/set max_new_tokens 8")
    output(out)
    app.handle_line("/context")
    assert f"at most, after the next answer: {sum(t for _, t in app.session.context_items([])):,} of {MAX_CONTEXT:,} tokens held" in out.getvalue()


def test_a_context_that_leaves_no_token_for_the_question_text_is_said_to_be_full(loaded, tmp_path):
    """/context, /set max_new_tokens and /system counted the next turn with an empty message, but a
    message is never empty: with the conversation, the template and the answer's reserve adding up
    to exactly the context, /context said "2,048 of 2,048 tokens held (100 %)", /set max_new_tokens
    said nothing, and every question was refused ("needs 164 cached + 19 new + 1,866 answer tokens
    = 2,049")."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    planned = sum(tokens for _, tokens in app.session.context_items([]))
    output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned}") == OK  # no token left for a text
    assert sum(tokens for _, tokens in app.session.context_items([])) == MAX_CONTEXT
    assert ("warning: the context has no room for another question and an answer this long"
            in " ".join(output(out).split()))
    assert app.handle_line("/context") == OK
    shown = " ".join(output(out).split())
    assert f"of {MAX_CONTEXT:,} tokens held" not in shown
    assert (f"the next question and its answer need more than {MAX_CONTEXT:,} tokens, over the {MAX_CONTEXT:,}-token "
            "context") in shown
    with pytest.raises(ContextOverflowError):
        app.session.check_attach([])  # as the app's warnings and the attach check read it
    assert app.handle_line("a") == ERROR  # the shortest question: as they say
    assert "over the 2,048-token context" in output(out)


def test_before_the_first_question_set_max_new_tokens_and_system_say_when_none_can_fit(loaded, tmp_path):
    """/set max_new_tokens warned of a conversation that leaves no room only once it had a turn:
    before the first one the system message alone can leave none (every message refused, without a
    word); and /system's warning then read "a shorter one make room"."""
    app, out = make_app(loaded, tmp_path)
    planned = sum(tokens for _, tokens in app.session.context_items([]))  # the system message, the template
    assert planned < MAX_CONTEXT // 2
    output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned}") == OK
    shown = " ".join(output(out).split())
    assert ("warning: the context has no room for a question and an answer this long under this system message; "
            "a shorter one (/system) makes room, or give a smaller max_new_tokens") in shown
    assert "/undo" not in shown
    assert app.handle_line("Hello.") == ERROR  # as it says
    output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned - 2}") == OK and "warning" not in output(out)
    longer = " ".join(app.session.default_system_message.split()) + " You answer in one short sentence, kindly."
    assert app.handle_line(f"/system {longer}") == OK
    shown = " ".join(output(out).split())
    assert ("warning: the context has no room for another question and its answer under this system message; a "
            "shorter one makes room, or /set max_new_tokens N with a smaller N") in shown


def test_system_says_when_it_leaves_no_room_for_the_next_question(loaded, tmp_path):
    """/system took a message the conversation fits under but the next question and its answer do
    not, without a word, and every question after it was refused (/load warns of the same)."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/system Be brief.")  # shorter than the tiny model's default
    app.handle_line("Hello.")
    planned = sum(tokens for _, tokens in app.session.context_items([]))
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned - 2}") == OK  # room for 2 more tokens
    output(out)
    assert app.handle_line("/system You answer in one short sentence, kindly.") == OK
    shown = " ".join(out.getvalue().split())
    assert shown.startswith("system message set; the 1 turn so far now follows it")
    assert ("warning: the context has no room for another question and its answer under this system message; a "
            "shorter one, /undo or /clear make room, or /set max_new_tokens N with a smaller N") in shown
    assert app.handle_line("Another question.") == ERROR  # as it says
    output(out)
    assert app.handle_line("/system Be brief.") == OK and "no room" not in out.getvalue()


def test_set_max_new_tokens_says_when_the_conversation_leaves_no_room_for_it(loaded, tmp_path):
    """/set max_new_tokens warned only of an answer as long as the whole context; one that fits an
    empty context but not this conversation was taken without a word, and every question refused."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    planned = sum(tokens for _, tokens in app.session.context_items([]))
    output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned + 1}") == OK  # one token too many
    assert ("warning: the context has no room for another question and an answer this long; /undo or /clear make "
            "room, or give a smaller max_new_tokens") in " ".join(out.getvalue().split())
    assert app.handle_line("Another question.") == ERROR  # as it says
    output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned - 1}") == OK and "warning" not in output(out)
    assert app.handle_line(f"/set max_new_tokens {8 + MAX_CONTEXT - planned - 20}") == OK
    assert app.handle_line("Another question.") == OK


def test_auto_attach_paths_in_messages(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"What is in {media / 'square.png'}?")
    assert "+ image square.png 448×448 → 1 tile" in out.getvalue()
    assert [m.path for m in app.session.turns[0].media] == [media / "square.png"]
    app.handle_line("Compare with /no/such/picture.png please.")
    assert "/no/such/picture.png does not exist" in out.getvalue()
    assert app.session.turns[1].media == []

    app2, out2 = make_app(loaded, tmp_path, **{"media.auto_attach": False})
    app2.handle_line(f"What is in {media / 'square.png'}?")
    assert "+ image" not in out2.getvalue() and app2.session.turns[0].media == []


def test_undo_retry_clear(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("First question.")
    app.handle_line("Second question.")
    answer = app.session.turns[-1].answer_ids
    assert app.handle_line("/undo") == OK and "removed turn 2: “Second question.”" in out.getvalue()
    assert [t.user_text for t in app.session.turns] == ["First question."]
    first_answer = app.session.turns[0].answer_ids
    assert app.handle_line("/retry") == OK
    assert [t.user_text for t in app.session.turns] == ["First question."]
    assert app.session.turns[0].answer_ids == first_answer  # greedy: the same answer again
    app.handle_line("Second question.")
    assert app.session.turns[-1].answer_ids == answer
    assert app.handle_line("/clear") == OK and app.session.turns == [] and app.session.context_used == 0
    assert app.handle_line("/undo") == ERROR and app.handle_line("/retry") == ERROR


def test_set_changes_generation_and_refuses_bad_values(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/set temperature 0.5") == OK
    assert app.session.params.temperature == 0.5 and "generation.temperature = 0.5" in out.getvalue()
    assert app.handle_line("/set top_p 2") == ERROR and app.session.params.top_p == 1.0
    assert out.getvalue().endswith("error: /set generation.top_p: must be a number in (0, 1], not '2'\n")  # the key once
    assert app.handle_line("/set model.max_context 100") == ERROR and "model.max_context is read at start" in out.getvalue()
    assert app.handle_line("/set tempreature 1") == ERROR and "did you mean 'temperature'" in out.getvalue()
    # a value the context cannot hold is said at once, not only when the next message is refused for it
    output(out)
    assert app.handle_line(f"/set max_new_tokens {MAX_CONTEXT}") == OK
    assert output(out) == (f"generation.max_new_tokens = {MAX_CONTEXT}\nwarning: the answer alone could fill the "
                           f"{MAX_CONTEXT:,}-token context, so every message will be refused; give a max_new_tokens "
                           f"well under {MAX_CONTEXT:,}\n")  # fmt: skip
    app.handle_line("/set max_new_tokens 3")
    assert "warning" not in output(out)
    app.handle_line("/set stats false")
    output(out)  # what came before is not under test
    app.handle_line("Hi.")
    assert len(app.session.turns[-1].answer_ids) <= 3
    assert "decode" not in out.getvalue()


def test_system_message_show_and_set(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/system")
    assert out.getvalue().startswith(f"system message (the model's default): {loaded.config.system_message}")
    app.handle_line("Hello.")
    app.handle_line("/system You are terse.")
    assert app.session.system_message == "You are terse." and app.settings.system.message == "You are terse."
    assert app.session.ids[: len(app.session.builder.first_turn("Hello.", []))] == app.session.builder.first_turn("Hello.", [])
    app.handle_line("/system ''")
    assert app.session.system_message is None
    assert app.handle_line("Still there?") == OK and len(app.session.turns) == 2


def test_system_text_in_quotes_is_what_they_hold(loaded, tmp_path):
    """`/system 'Be terse.'` sets what `/set system.message 'Be terse.'` sets: the quotes had reached
    the model as part of the system message (the prompt read `'Be terse.'`)."""
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/system 'Be terse.'") == OK and app.session.system_message == "Be terse."
    assert app.handle_line('/system "Be brief."') == OK and app.session.system_message == "Be brief."
    assert app.handle_line("/set system.message 'Be terse.'") == OK and app.session.system_message == "Be terse."
    assert app.handle_line("/system 'Be' \"terse\"") == OK and app.session.system_message == "'Be' \"terse\""
    assert app.handle_line("/system ''") == OK and app.session.system_message is None


def test_system_default_brings_back_the_models_own_message(loaded, tmp_path):
    # once /system (or /set system.message, a flag, the config) had changed it, nothing brought the
    # checkpoint's default back: `/system ""` means none, `/set system.message none` the text "none"
    default = loaded.config.system_message
    app, out = make_app(loaded, tmp_path)
    assert default and app.handle_line("/system You are terse.") == OK
    assert app.handle_line("Hello.") == OK and app.handle_line("Go on.") == OK
    output(out)
    assert app.handle_line("/system --default") == OK
    assert output(out) == "system message: the model's default again; the 2 turns so far now follow it (/system shows it)\n"
    assert app.session.system_message == default and app.settings.system.message is None
    # the turns so far were read again under it, as chatting under it from the start reads them
    assert app.session.ids == app.session.conversation_ids(app.session.turns)
    assert app.session.builder.system_message == default
    app.handle_line("/system")
    assert output(out) == f"system message (the model's default): {default}\n"
    app.handle_line("/set system.message")
    assert output(out) == f'system.message = (not set: the model\'s default, "{default}")  (from /system --default)\n'
    app.handle_line("/show")
    assert "\n# message = (not set: the model's default, …)  # from /system --default\n" in output(out)
    assert app.handle_line("/retry") == OK and app.handle_line("/undo") == OK and app.handle_line("Again?") == OK
    assert app.session.ids == app.session.conversation_ids(app.session.turns)
    # from no system message too; pasted before a message, it ends with its line
    assert app.handle_line("/system ''") == OK and app.session.system_message is None
    assert app.handle_line("/system --default\nAnd now?") == OK
    assert app.session.system_message == default and app.session.turns[-1].user_text == "And now?"
    assert app.handle_line("/system --defualt") == ERROR and app.session.system_message == default


def test_a_session_saved_with_the_default_system_message_loads_as_the_default(loaded, tmp_path):
    default = loaded.config.system_message
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/system Be brief.")
    app.handle_line("/system --default")
    app.handle_line("Hello.")
    assert app.handle_line(f"/save {tmp_path / 'talk.json'}") == OK
    assert json.loads((tmp_path / "talk.json").read_text())["system_message"] == default  # the text, as a local file keeps it
    app.handle_line("/system Be brief.")
    output(out)
    assert app.handle_line(f"/load {tmp_path / 'talk.json'}") == OK
    assert "the system message saved with the session is in use" in output(out)
    assert app.session.system_message == default and app.settings.system.message is None
    app.handle_line("/set system.message")  # the model's default, not its text set by the file
    assert output(out) == f'system.message = (not set: the model\'s default, "{default}")  (from session talk.json)\n'


@pytest.mark.parametrize("word", ["none", "Default"])
def test_set_system_message_to_an_unset_word_says_it_is_the_text(loaded, tmp_path, word):
    # `/set seed none` unsets the seed, but a system message is any text: say how to get the default
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/set system.message {word}") == OK and app.session.system_message == word
    assert output(out) == ("system message set\n(that text is the system message now; /system --default restores "
                           "the model's default, /system '' removes it)\n")  # fmt: skip
    app.handle_line("/set system.message Be brief.")
    assert output(out) == "system message set\n"


def test_a_system_message_of_several_lines_is_a_triple_quote_block(loaded, tmp_path):
    # `/system """` set the system message to the three quotes; in a script the lines after it
    # were then sent as messages, and the closing quotes opened a block that took the rest
    assert block_is_open('/system """') and block_is_open('/SYSTEM  """\nBe brief.')
    assert not block_is_open('/system """\nBe brief.\n"""') and not block_is_open('/system Be brief. """')
    # an invisible mark before the slash is the command's (parse_line runs it): Enter sent the opener alone
    assert block_is_open('\u200b/system """') and not block_is_open('\ufeff/system """\nBe brief.\n"""')
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line('/system """\nBe brief.\n\nAnswer in one word.\n"""') == OK
    assert app.session.system_message == "Be brief.\n\nAnswer in one word."
    assert app.handle_line('/system """') == ERROR  # unclosed: said, the message kept
    assert output(out).splitlines()[-1] == 'error: unclosed """ block; end it with a line holding """'
    assert app.session.system_message == "Be brief.\n\nAnswer in one word."
    assert app.handle_line('/system """Be terse."""') == OK and app.session.system_message == "Be terse."


def test_set_system_message_takes_a_triple_quote_block_as_system_does(loaded, tmp_path):
    # the REPL's Enter and a script read `/set system.message """` as one line: it failed as an
    # unclosed block, and the lines after it went to the model as messages
    assert block_is_open('/set system.message """') and block_is_open('/SET  system.message """\nBe brief.')
    assert not block_is_open('/set system.message """\nBe brief.\n"""') and not block_is_open('/set temperature """')
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line('/set system.message """\nBe brief.\n\nAnswer in one word.\n"""') == OK
    assert app.session.system_message == "Be brief.\n\nAnswer in one word."


def test_the_system_message_in_use_again_does_not_reread_the_conversation(loaded, tmp_path, monkeypatch):
    # `/system --default` with the default in use re-read every turn (minutes for a long conversation
    # on a CPU) and said the turns "now follow it"
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    replays = []
    real_set_system = app.session.set_system
    monkeypatch.setattr(app.session, "set_system", lambda text: replays.append(text) or real_set_system(text))
    output(out)
    assert app.handle_line("/system --default") == OK and replays == []
    assert output(out) == "system message: the model's default again (/system shows it)\n"
    assert app.handle_line("/system Be brief.") == OK and replays == ["Be brief."]
    assert output(out) == "system message set; the 1 turn so far now follows it\n"
    assert app.handle_line("/set system.message Be brief.") == OK and replays == ["Be brief."]
    assert output(out) == "system message unchanged\n"
    assert app.settings.sources["system.message"] == "/system" and app.session.system_message == "Be brief."


def test_set_says_an_empty_system_message_means_none_in_words(loaded, tmp_path):
    # after `/set system.message ""` (removing it), `/set system.message` showed only `""`, which
    # read as a message of two quotes; the value stays as the config file writes it
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line('/set system.message ""') == OK and app.session.system_message is None
    output(out)
    assert app.handle_line("/set system.message") == OK
    assert output(out) == 'system.message = "" (none: no system message is sent)  (from /system)\n'
    assert app.handle_line("/set") == OK
    assert '  system.message                = "" (none: no system message is sent)  (from /system)\n' in output(out)
    app.settings.set("remote.server", "http://gpu:8000/v1", source="flag")  # none sent: the server's template decides
    app.handle_line("/set system.message")
    app.handle_line("/system")
    assert output(out) == ('system.message = "" (none is sent, the server decides)  (from /system)\n'
                           "no system message is sent; the server's chat template decides\n")  # fmt: skip


def test_set_and_show_say_an_unset_system_message_is_the_models_default(loaded, tmp_path):
    # `/set` listed `system.message = (not set)` while /system showed the model's default in use
    app, out = make_app(loaded, tmp_path)
    default = loaded.config.system_message
    assert default and app.handle_line("/set system.message") == OK
    assert output(out) == f'system.message = (not set: the model\'s default, "{default}")  (from default)\n'
    assert app.handle_line("/set") == OK
    listed = output(out)  # the default is long: only … here, /set KEY shows it whole
    assert "  system.message                = (not set: the model's default, …)  (from default)\n" in listed
    assert listed.endswith("(… marks a value cut short; /set KEY shows it whole)\n")
    app.handle_line("Hello.")
    output(out)
    assert app.handle_line("/show") == OK
    assert "\n# message = (not set: the model's default, …)  # from default\n" in output(out)
    app.settings.set("remote.server", "http://gpu:8000/v1", source="flag")  # none sent: the server decides
    app.session.system_message = None
    app.handle_line("/set system.message")
    app.handle_line("/system")
    assert output(out) == ("system.message = (not set: none is sent, the server decides)  (from default)\n"
                           "no system message is sent; the server's chat template decides\n")  # fmt: skip


def test_show_lists_only_the_settings_sections_this_chat_uses(loaded, tmp_path):
    # /show listed [serve] (internvl-chat serve's) and, without a server, [remote], read as in use
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/show") == OK
    shown = output(out)
    sections = [line for line in shown.splitlines() if line.startswith("[")]
    assert sections == ["[model]", "[generation]", "[media]", "[ui]", "[system]"]
    assert shown.endswith("not shown, as they do not apply to this chat: [serve] (internvl-chat serve's), "
                          "[remote] (for --server); --print-config lists every setting\n")  # fmt: skip
    app.handle_line("/set serve.port")  # shown when asked, and said not to apply
    assert output(out).endswith("serve.port = 8000  (from default)\n(not used by this chat: [serve] is internvl-chat serve's)\n")
    app.handle_line("/set temperature")
    assert "not used" not in output(out)

    app.settings.set("remote.server", "http://gpu:8000/v1", source="flag")  # a server's chat: [remote], not [model]
    app.session.system_message = None
    app.handle_line("/show")
    shown = output(out)
    assert [line for line in shown.splitlines() if line.startswith("[")] == ["[generation]", "[media]", "[ui]", "[system]", "[remote]"]
    assert 'server = "http://gpu:8000/v1"' in shown and "[model] (for a local model)" in shown.splitlines()[-1]
    app.handle_line("/set model.max_context")
    assert output(out).endswith("(not used by this chat: [model] is for a local model)\n")


@pytest.mark.parametrize("start", ["colour", "plain", "never"])
def test_set_plain_turns_the_colours_off_and_back_on_as_at_start(loaded, tmp_path, monkeypatch, start):
    # `/set plain` was an unknown setting ("did you mean 'ui.plain'?"), and `/set ui.plain on` kept
    # the colours (and `off` after --plain did not bring them back): only Markdown followed it
    monkeypatch.delenv("NO_COLOR", raising=False)
    overrides = {"ui.plain": start == "plain", "ui.color": "never" if start == "never" else "auto"}
    settings = load_settings(os.devnull, env={}, overrides=overrides)
    out = io.StringIO()  # a terminal's console, with colours unless the start said none (as make_console does)
    console = Console(file=out, width=200, force_terminal=True, color_system="standard", no_color=start != "colour")
    app = App(Session(loaded, params=sampling_params(settings)), settings, console, cwd=tmp_path)

    def green() -> bool:
        output(out)
        app.say("text", "green")
        return "\x1b[32m" in output(out)

    assert green() == (start == "colour")
    assert app.handle_line("/set plain on") == OK and app.settings.ui.plain and app.plain
    assert not green()
    assert app.handle_line("/set ui.plain off") == OK and not app.settings.ui.plain
    assert green() == (start != "never")  # ui.color = never still holds


def test_set_takes_a_system_message_of_several_words(loaded, tmp_path):
    # /set lists system.message among what it changes, but `/set system.message Be brief.` was
    # refused as too many arguments unless the message was quoted
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/set system.message Be brief. Answer in one word.") == OK
    assert app.session.system_message == "Be brief. Answer in one word."
    assert app.handle_line("/set temperature 0.5 0.7") == ERROR  # still one value: said, not half-used
    assert "not '0.5 0.7'" in output(out) and app.settings.generation.temperature == 0.0


def test_show_uses_image_placeholders(loaded, media, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("Describe it.")
    output(out)  # what came before is not under test
    app.handle_line("/show")
    text = out.getvalue()
    assert "<image>\nDescribe it.<|im_end|>" in text and "<IMG_CONTEXT>" not in text
    assert "[generation]" in text and "max_new_tokens = 8" in text


def test_show_after_the_first_turn_says_it_shows_only_what_the_turn_added(loaded, media, tmp_path):
    # turn 2's /show started with a bare <|im_end|> (the end of turn 1's answer) and did not say
    # that it was only the part of the prompt that turn added
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    app.handle_line("/show")
    assert output(out).startswith(f"last prompt, turn 1:\n<|im_start|>system\n{loaded.config.system_message}")
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("Describe it.")
    output(out)
    app.handle_line("/show")
    text = output(out)
    assert text.startswith("last prompt, turn 2 (only what it added to the conversation before it; the first "
                           "<|im_end|> closes turn 1's answer; each <image> stands for ")  # fmt: skip
    assert " in all):\n<|im_end|>\n<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n" in text


def test_save_load_export(loaded, media, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/export empty.md") == OK  # said, as /save says it
    assert output(out) == "warning: the conversation is empty; exported it anyway\nexported 0 turns to " \
                          f"{tmp_path / 'empty.md'}\n"
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("Describe it.")
    app.handle_line("More.")
    assert app.handle_line("/save") == OK
    saved = list((tmp_path / "home" / ".local" / "state" / "internvl-chat" / "sessions").glob("session-*.json"))
    assert len(saved) == 1 and f"saved 2 turns to {saved[0]}" in out.getvalue()

    other, out2 = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {saved[0]}") == OK
    assert [t.user_text for t in other.session.turns] == ["Describe it.", "More."]
    assert other.session.ids == app.session.ids
    assert "loaded 2 turns" in out2.getvalue()

    assert other.handle_line("/export talk.md") == OK  # relative to the app's folder
    md = (tmp_path / "talk.md").read_text()
    assert f"![small.png](<{(media / 'small.png').resolve()}>)" in md
    assert md.index("## User") < md.index("Describe it.") < md.index("## Assistant") < md.index("More.")
    assert sanitize(app.session.turns[0].answer_text) in md  # as shown: a random model's controls dropped
    assert other.handle_line("/load nothing-here.json") == ERROR
    assert len(other.session.turns) == 2


def test_help_and_exit(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/help")
    for name in ("/image", "/video", "/context", "/export", "/exit"):
        assert name in out.getvalue()
    app.handle_line("/help video")
    assert "--frames N" in out.getvalue()
    assert app.handle_line("/quit") == EXIT and app.handle_line("/exit") == EXIT


# --- Ctrl-C ---------------------------------------------------------------------------------------


class InterruptOnFirstWrite(io.StringIO):
    """Sends this process a real SIGINT when the first answer text is written (once armed)."""

    armed = False

    def write(self, s: str) -> int:
        if self.armed and s.strip():
            self.armed = False
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(s)


def test_ctrl_c_during_the_answer_keeps_the_partial_answer(loaded, tmp_path):
    file = InterruptOnFirstWrite()
    app, out = make_app(loaded, tmp_path, file=file, interactive=True, **{"ui.plain": True, "generation.max_new_tokens": 300})
    file.armed = True
    assert app.handle_line("Tell me a very long story.") == OK
    turn = app.session.turns[-1]
    assert turn.finish_reason == "cancelled" and turn.answer_text.endswith("[cancelled]")
    assert len(turn.answer_ids) < 300
    assert "[cancelled: the partial answer is kept" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert app.handle_line("Another question.") == OK
    assert len(app.session.turns) == 2 and app.session.turns[-1].finish_reason in ("stop", "length")


def test_ctrl_c_before_the_answer_leaves_everything_as_it_was(loaded, media, tmp_path, monkeypatch):
    app, out = make_app(loaded, tmp_path, interactive=True)
    app.handle_line("Hello.")
    ids = list(app.session.ids)
    app.handle_line(f"/image {media / 'square.png'}")
    real = loaded.model.encode_images

    def interrupted(pixels, cancel=None):  # Ctrl-C pressed while the vision encoder runs
        os.kill(os.getpid(), signal.SIGINT)
        return real(pixels, cancel)

    monkeypatch.setattr(loaded.model, "encode_images", interrupted)
    assert app.handle_line("What is it?") == OK
    assert "[cancelled before the answer began; the conversation is unchanged]" in out.getvalue()
    assert app.session.ids == ids and len(app.session.turns) == 1 and len(app.pending) == 1
    monkeypatch.setattr(loaded.model, "encode_images", real)
    assert app.handle_line("What is it?") == OK
    assert len(app.session.turns) == 2 and app.session.turns[1].media[0].path.name == "square.png"


class CtrlCTwice(ChunkedAnswers):
    """A server's answer that stops coming after its first words, and a user who presses Ctrl-C
    twice: the first asks the answer to stop (the app's handler sets `cancel`), the second lands as
    the turn winds down, in the conversation (`where` "commit") or as the answer's end is printed
    ("end"). `signal.raise_signal` runs the handler at once, where it is called."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def ask(self, text, media=(), params=None, cancel=None):
        yield {"text": "Once upon a time", "finish_reason": None}
        signal.raise_signal(signal.SIGINT)  # the server is silent: the user presses Ctrl-C
        assert cancel.is_set()
        if self.where == "commit":
            signal.raise_signal(signal.SIGINT)  # and again, before the cut answer is kept
        self.turns.append(_Turn(user_text=text, answer_text="Once upon a time", media=list(media), timing={},
                                answer_tokens=None, finish_reason="cancelled"))  # fmt: skip
        yield {"text": "", "finish_reason": "cancelled", "timing": {}, "usage": {}}


class InterruptOnNewline(io.StringIO):
    """Sends this process a SIGINT (at once) when a line break is written, once armed."""

    armed = False

    def write(self, s: str) -> int:
        if self.armed and "\n" in s:
            self.armed = False
            signal.raise_signal(signal.SIGINT)
        return super().write(s)


@pytest.mark.parametrize("where", ["commit", "end"])
def test_a_second_ctrl_c_as_a_cancelled_answer_winds_down_changes_nothing(tmp_path, where):
    """Found over --server (a server gone silent, Ctrl-C pressed twice): the second Ctrl-C raised
    wherever it landed. In the turn's commit the answer the user had watched, and asked to keep, was
    discarded ("[interrupted: this answer was discarded …]"); as its end printed it escaped the
    answer: the REPL said only "[interrupted]" though the answer was kept, and rich printed it twice."""
    out = InterruptOnNewline()
    settings = load_settings(os.devnull, env={}, overrides={"ui.plain": True})
    conversation = CtrlCTwice(where)
    app = App(conversation, settings, Console(file=out, width=80, color_system=None), interactive=True, cwd=tmp_path)
    out.armed = where == "end"  # the line break that ends the cut answer's text
    try:
        result = app.handle_line("Tell me a story.")
    except KeyboardInterrupt:  # uncaught, it would end the test run
        pytest.fail("the second Ctrl-C escaped the answer: the REPL says only [interrupted]")
    assert result == OK and [t.finish_reason for t in conversation.turns] == ["cancelled"]
    text = out.getvalue()
    assert text.count("Once upon a time") == 1 and "[cancelled: the partial answer is kept" in text, text
    assert "interrupted" not in text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_without_interactive_ctrl_c_propagates(loaded, tmp_path):
    file = InterruptOnFirstWrite()
    app, _ = make_app(loaded, tmp_path, file=file, **{"ui.plain": True, "generation.max_new_tokens": 300})
    file.armed = True
    with pytest.raises(KeyboardInterrupt):
        app.handle_line("Tell me a very long story.")
    assert app.session.turns == [] and app.session.context_used == 0


def test_ctrl_c_during_retry_prefill_says_what_was_lost(loaded, tmp_path, monkeypatch):
    app, out = make_app(loaded, tmp_path, interactive=True)
    app.handle_line("First.")
    app.handle_line("Second.")
    real = loaded.model.forward

    def interrupted(*args, **kwargs):  # Ctrl-C pressed during the retry's prefill
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", interrupted)
    assert app.handle_line("/retry") == OK
    monkeypatch.setattr(loaded.model, "forward", real)
    assert [t.user_text for t in app.session.turns] == ["First."]  # Session.retry drops the turn first
    assert "the last question and its answer were removed; ask it again" in out.getvalue()
    assert app.handle_line("Second.") == OK and len(app.session.turns) == 2


def test_stats_after_retry_say_that_one_prompt_token_was_prefilled(loaded, media, tmp_path):
    # /retry feeds only the last token of its turn's cached prompt again: /stats must not claim the
    # whole prompt (a picture's hundreds of tokens) was prefilled
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("What is it?")
    output(out)  # what came before is not under test
    app.handle_line("/stats")
    assert not re.search(r"^prefill +1 token ", out.getvalue(), re.M)
    app.handle_line("/retry")
    output(out)
    app.handle_line("/stats")
    assert re.search(r"^prefill +1 token in \d+\.\d{3} s", out.getvalue(), re.M), out.getvalue()  # not "1 tokens"


def test_stats_shows_vision_time_only_when_a_picture_was_encoded(loaded, media, tmp_path):
    # /stats said "vision 0.000 s" after a text-only answer (and after /retry, which reuses the
    # features), where the stats line under the answer rightly says nothing
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"/image {media / 'small.png'}")
    app.handle_line("What is it?")
    output(out)  # what came before is not under test
    app.handle_line("/stats")
    assert re.search(r"^vision +\d+\.\d{3} s$", out.getvalue(), re.M)
    for line in ("And then?", "/retry"):
        app.handle_line(line)
        output(out)  # what came before is not under test
        app.handle_line("/stats")
        assert "vision" not in out.getvalue() and out.getvalue().startswith("finish")


def test_a_ctrl_c_while_the_spinner_starts_leaves_no_spinner_behind(loaded, tmp_path, monkeypatch):
    # Ctrl-C just after Enter could land inside the spinner's start, before its `with` took hold:
    # it then spun on over every later prompt and answer
    import rich.status

    settings = load_settings(os.devnull, env={}, overrides={})
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    app = App(Session(loaded, params=sampling_params(settings)), settings, console, interactive=True)
    started = []
    real_start = rich.status.Status.start

    def start_then_interrupt(status) -> None:
        real_start(status)
        started.append(status)
        raise KeyboardInterrupt

    monkeypatch.setattr(rich.status.Status, "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with app.spinner("reading the images …"):
                pass
        assert started and not started[0]._live.is_started
    finally:
        for status in started:
            status.stop()


@pytest.mark.parametrize("cwd_known", [True, False])
def test_a_file_named_tilde_something_is_attached_as_dot_slash_tilde(loaded, tmp_path, monkeypatch, cwd_known):
    # `./~root.png` reached Path as `~root.png` (pathlib drops the `./`), which the app then read as
    # root's home folder (or "there is no user" for another name), so such a file could not be
    # attached at all, although tab completion inserts it as `./~…`; `~/…` still means home
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for name in ("~root.png", "~no-such-user-internvl-chat.png", "home/cat.png"):
        Image.fromarray(textured_rgb(64, 48, seed=1)).save(tmp_path / name)
    app, out = make_app(loaded, tmp_path if cwd_known else None, **{"media.max_tiles": 1})
    from internvl_chat.ui.repl import complete_path

    assert [c.text for c in complete_path("./~r", "image", tmp_path)] == ["./~root.png"]  # as Tab inserts it
    assert app.handle_line("/image ./~root.png './~no-such-user-internvl-chat.png' ~/cat.png") == OK, output(out)
    assert [m.path.resolve() for m in app.pending] == [tmp_path / "~root.png", tmp_path / "~no-such-user-internvl-chat.png",
                                                       tmp_path / "home" / "cat.png"]  # fmt: skip
    app, out = make_app(loaded, tmp_path if cwd_known else None, **{"media.max_tiles": 1})
    assert app.handle_line("What is in ./~root.png?") == OK, output(out)
    assert [m.path.resolve() for t in app.session.turns for m in t.media] == [tmp_path / "~root.png"]
    assert app.handle_line("/image ~no-such-user-internvl-chat/x.png") == ERROR
    assert "there is no user 'no-such-user-internvl-chat'" in output(out)


def test_an_image_command_pasted_below_the_question_leaves_no_stray_command_word(tmp_path):
    # `/image a.png` on a message's second line is text: its path was attached and the model read "/image"
    from internvl_chat.ui.media_paths import take_media_paths

    for name in ("a.png", "b.mp4", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    text = "Compare these:\n/image a.png\n/VIDEO  b.mp4 \nWhich is larger?\n/image\n/image c.png or not"
    found = [tmp_path / name for name in ("a.png", "b.mp4", "c.png")]
    assert take_media_paths(text, tmp_path) == ("Compare these:\nWhich is larger?\n/image\n/image or not", found, [])
    # copied from a web page, a zero-width space before the slash: "\u200b/image" was left for the model
    assert take_media_paths("Compare:\n\u200b/image a.png", tmp_path) == ("Compare:", [tmp_path / "a.png"], [])


def test_a_video_command_with_its_options_pasted_below_the_question_attaches_with_them(loaded, media, tmp_path):
    # `/video clip.mp4 --frames 4` on a message's second line: the path was attached with the default
    # frames and the model read "/video --frames 4"; the line is the command, its options applied
    app, out = make_app(loaded, tmp_path)
    clip = media / "clip.mp4"
    assert app.handle_line(f"Describe this\n/video {clip} --frames 2 --range 1-2\nbriefly") == OK, output(out)
    turn = app.session.turns[-1]
    assert turn.user_text == "Describe this\nbriefly"
    assert [(m.kind, m.tiles, m.video_range) for m in turn.media] == [("video", 2, (1.0, 2.0))]
    # a bad option stops the message as a failing command does: nothing is sent
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"Describe this\n/video {clip} --frames 0") == ERROR
    assert not app.session.turns and not app.pending
    assert "--frames" in output(out)
    # a """ block is text as written: such a line in it runs nothing (the way to send it as text)
    app, out = make_app(loaded, tmp_path, **{"media.frames": 2})
    assert app.handle_line('"""\nDescribe this\n/video is a command; --frames=2 sets its frames\n"""') == OK, output(out)
    assert app.session.turns[-1].user_text == "Describe this\n/video is a command; --frames=2 sets its frames"
    # without options the line is text, its path attached as in a message (unchanged)
    app, out = make_app(loaded, tmp_path, **{"media.frames": 2})
    assert app.handle_line(f"Describe this\n/video {clip}") == OK, output(out)
    assert app.session.turns[-1].user_text == "Describe this" and len(app.session.turns[-1].media) == 1


def test_a_pasted_message_whose_video_line_fails_is_offered_back_with_nothing_left_attached(loaded, media, tmp_path):
    # a failing `/video … --frames 0` below the question: the message was not sent, yet neither
    # offered back at the next prompt (as a message that fails is) nor were the videos of the lines
    # before it dropped: the paste, sent again, attached them twice
    app, out = make_app(loaded, tmp_path)
    clip = media / "clip.mp4"
    typed = f"Describe these\n/video {clip} --frames 2\n/video {clip} --frames 0"
    assert app.handle_line(typed) == ERROR
    assert not app.session.turns and app.pending == []
    assert app.failed_message == typed
    # the message itself failing (a picture it names does not decode): offered back, as it was, and
    # the video its line attached is dropped, so sending it again attaches it once
    app, out = make_app(loaded, tmp_path)
    typed = f"Describe {media / 'corrupt.png'}\n/video {clip} --frames 2"
    assert app.handle_line(typed) == ERROR
    assert not app.session.turns and app.pending == []
    assert app.failed_message == typed
    # a command typed before the paste keeps what it attached
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"/image {media / 'square.png'}") == OK
    assert app.handle_line(f"Describe these\n/video {clip} --frames 0") == ERROR
    assert [m.path.name for m in app.pending] == ["square.png"]


def _turn_sent(loaded, cwd, typed: str):
    """The turn a fresh app sends for the message `typed` (asserting it was sent)."""
    app, out = make_app(loaded, cwd)
    assert app.handle_line(typed) == OK, output(out)
    return app.session.turns[-1]


@pytest.mark.parametrize("as_text, as_command, text_of_command", [
    # a question with a Markdown snippet pasted below it ("what does this do?" then a fenced
    # `/video PATH --frames N`): the line in the code block ran as the command ("PATH does not exist")
    # and the message was not sent; a fenced block is text as written, as a """ block is.
    # After the block closes, such a line is the command again
    pytest.param("What does this do?\n```\n/video PATH --frames N\n```\n~~~text\n/image PATH --frames 2\n~~~",
                 "Compare\n```sh\nls\n```\n/video {clip} --frames 2", "Compare\n```sh\nls\n```", id="fenced"),
    # a snippet pasted as a Markdown indented code block (4 spaces or a tab): its `/video PATH
    # --frames N` line ran as the command ("PATH does not exist"), the message not sent, where a
    # fenced block's is text. Indented by fewer than 4 columns, such a line is the command, as before
    pytest.param("What does this do?\n\n    /video PATH --frames N\n\t/image PATH --frames 2\n  \t/video PATH --frames 3",
                 "Compare\n   /video {clip} --frames 2", "Compare", id="indented"),
])  # fmt: skip
def test_a_video_line_with_options_in_a_pasted_code_block_is_text(loaded, media, tmp_path, as_text, as_command,
                                                                   text_of_command):  # fmt: skip
    assert _turn_sent(loaded, tmp_path, as_text).user_text == as_text
    turn = _turn_sent(loaded, tmp_path, as_command.format(clip=media / "clip.mp4"))
    assert turn.user_text == text_of_command
    assert [(m.kind, m.tiles) for m in turn.media] == [("video", 2)]


@pytest.mark.parametrize("name", ["photo.qoi", "photo.tga"])
def test_a_qoi_or_tga_named_in_a_message_is_attached(loaded, tmp_path, name):
    # these were sent as text (the extension list of a message's paths lacked them), though /image reads them
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(tmp_path / name)
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"describe {tmp_path / name}")
    assert f"+ image {name} 448×448 → 1 tile" in out.getvalue()
    assert [m.path for m in app.session.turns[0].media] == [tmp_path / name]
    assert app.session.turns[0].user_text == "describe"


def test_retry_under_a_fixed_seed_says_it_gives_the_same_answer_and_how_to_get_another(loaded, tmp_path):
    """`/set seed S` with a temperature: every /retry sampled the very answer it replaced, without a
    word. It says so before answering, and how to get another; a fresh process with that seed still
    answers as the first time (the seed applies per turn), and without a seed nothing is said."""
    app, out = make_app(loaded, tmp_path, **{"generation.temperature": 1.0, "generation.seed": 7})
    assert app.handle_line("Describe a cat.") == OK
    first = app.session.turns[-1].answer_ids
    output(out)
    assert app.handle_line("/retry") == OK
    said = output(out)
    assert "seed 7 gives the same answer again" in said and "/set seed none" in said, said
    assert app.session.turns[-1].answer_ids == first
    again, _ = make_app(loaded, tmp_path, **{"generation.temperature": 1.0, "generation.seed": 7})
    assert again.handle_line("Describe a cat.") == OK and again.session.turns[-1].answer_ids == first
    assert again.handle_line("/set seed none") == OK
    output(_)
    assert again.handle_line("/retry") == OK and "seed" not in output(_)


def test_a_greedy_retry_says_once_that_it_gives_the_same_answer_and_how_to_get_another(loaded, tmp_path):
    """Under temperature 0 (the default) /retry gave the very answer it replaced, without a word, where
    a fixed seed's retry says so. It says so too, as the seed's note does, at the first greedy retry
    only (every retry would repeat it: greedy is the default); a seed with it adds no second note."""
    app, out = make_app(loaded, tmp_path, **{"generation.seed": 7})
    assert app.handle_line("Describe a cat.") == OK
    first = app.session.turns[-1].answer_ids
    output(out)
    assert app.handle_line("/retry") == OK
    said = output(out)
    assert "(temperature 0 gives the same answer again under the same settings; /set temperature 0.7 for another)" in said
    assert "seed 7" not in said, said
    assert app.session.turns[-1].answer_ids == first
    assert app.handle_line("/retry") == OK and "temperature" not in output(out)
    assert app.handle_line("/set temperature 0.7") == OK and app.session.params.temperature == 0.7


def test_a_retry_refused_over_the_context_says_no_fixed_seed_note(loaded, tmp_path):
    """The fixed-seed note ("seed 7 gives the same answer again …") was printed before /retry ran,
    so a retry its budget check refused said it would give the same answer, then that it could not
    run. The note comes only with an answer the retry gives."""
    app, out = make_app(loaded, tmp_path, **{"generation.temperature": 1.0, "generation.seed": 7})
    assert app.handle_line("Describe a cat.") == OK
    last = app.session.turns[-1]
    app.session.params.max_new_tokens = app.session.max_context - (last.ids_before + len(last.prompt_ids)) + 1
    output(out)
    assert app.handle_line("/retry") == ERROR
    said = output(out)
    assert "over the" in said and "seed 7" not in said, said
    app.session.params.max_new_tokens = 8
    assert app.handle_line("/retry") == OK and "seed 7 gives the same answer again" in output(out)


def test_a_pasted_attach_line_that_fails_gives_its_message_back_with_nothing_left_attached(loaded, media, tmp_path):
    """A paste of `/image X` and a question, X missing: the question was "(the 1 line after it was
    not run)" and lost (only the Up arrow found it). The paste from its run of /image and /video
    lines on is given back for the next prompt, as a message that fails before it is sent is, and
    the pictures those lines attached are dropped: Enter, once the path is fixed, attaches and asks
    again, without a picture twice. Commands before that run have run and do not come back."""
    app, out = make_app(loaded, tmp_path)
    square = media / "square.png"
    assert app.handle_line("/image nothing.png\nWhat?\nMore.") == ERROR
    assert output(out).endswith("(the 2 lines after it were not run)\n")
    assert app.failed_message == "/image nothing.png\nWhat?\nMore." and app.pending == []
    assert app.handle_line(f"/set temperature 0.5\n/image {square}\n/image nothing.png\nWhat?") == ERROR
    assert app.failed_message == f"/image {square}\n/image nothing.png\nWhat?" and app.pending == []
    assert output(out).endswith("(the 1 line after it was not run; 1 file the lines before it attached was dropped)\n")
    assert app.session.params.temperature == 0.5
    assert app.handle_line(app.failed_message.replace("nothing.png", str(square))) == OK
    assert [(t.user_text, [m.path.name for m in t.media]) for t in app.session.turns] == [("What?", ["square.png"] * 2)]
    assert app.failed_message is None
    # attached before the paste: kept, and a mistyped command gives the paste back as well
    assert app.handle_line(f"/image {square}") == OK and len(app.pending) == 1
    assert app.handle_line(f"/image {square}\n/imgae x.png\nWhat?") == ERROR
    assert app.failed_message == f"/image {square}\n/imgae x.png\nWhat?" and len(app.pending) == 1
    # a failing command alone is not given back (as before)
    assert app.handle_line("/image nothing.png") == ERROR and app.failed_message is None


def test_a_mistyped_command_in_a_paste_says_what_its_attach_lines_dropped(loaded, media, tmp_path):
    """A paste of `/image X`, a mistyped command and a question: the paste is given back and the
    picture its /image line attached is dropped (Enter attaches it again), as for a command that
    fails as it runs, but only the latter said so: after "+ image X" and an error that named only the
    lines not run, the picture seemed attached still."""
    app, out = make_app(loaded, tmp_path)
    square = media / "square.png"
    assert app.handle_line(f"/image {square}\n/imgae x.png\nWhat?") == ERROR
    said = output(out)
    assert app.failed_message == f"/image {square}\n/imgae x.png\nWhat?" and app.pending == []
    assert "(it and the 1 line after it were not run; 1 file the lines before it attached was dropped)" in said, said
    # nothing dropped: nothing said of it
    assert app.handle_line("/imgae x.png\nWhat?") == ERROR
    assert "dropped" not in output(out)


def test_a_failing_command_after_attach_lines_in_a_paste_gives_them_back_too(loaded, media, tmp_path):
    """`/image X`, `/set` with a bad value, a question: README, architecture.md and _give_back say
    the paste comes back from the run of /image and /video lines just before the failing line, their
    files dropped, and a mistyped command did so; a command that failed as it ran gave back only
    itself and what followed, X left attached."""
    app, out = make_app(loaded, tmp_path)
    square = media / "square.png"
    paste = f"/image {square}\n/set temperature -1\nWhat?"
    assert app.handle_line(paste) == ERROR
    assert app.failed_message == paste and app.pending == []
    assert output(out).endswith("(the 1 line after it was not run; 1 file the lines before it attached was dropped)\n")
    # a /set that ran ends the run: a failing line after it gives back from that line
    assert app.handle_line(f"/image {square}\n/set temperature 0.5\n/set temperature -1\nWhat?") == ERROR
    assert app.failed_message == "/set temperature -1\nWhat?" and len(app.pending) == 1
    # nor does a mistyped command after it take back what the lines before the /set attached
    app.pending.clear()
    assert app.handle_line(f"/image {square}\n/set temperature 0.5\n/imgae x.png\nWhat?") == ERROR
    assert app.failed_message == "/imgae x.png\nWhat?" and len(app.pending) == 1
