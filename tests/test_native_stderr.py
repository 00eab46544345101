"""Text native libraries write to fd 2 themselves stays off the terminal (native_stderr.py).

Each app test runs the app on a file that makes a library write to fd 2 (before: decord's
"[hh:mm:ss] …video_reader.cc:83: ERROR opening: PATH, …", libtiff's "ZIPDecode: Decoding error …",
a Rust panic with its backtrace) and asserts that stderr holds our lines and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from media_helpers import write_numbered_video
from qwen_like_tokenizer import redos_pre_tokenizer

from internvl_chat.files import visible

REPO = Path(__file__).resolve().parent.parent


def _app(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # RUST_BACKTRACE=1 as a developer's shell may have it: a panic then writes ~50 lines
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "RUST_BACKTRACE": "1"}
    env.pop("INTERNVL_CHAT_VIDEO_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--device", "cpu", "--max-new-tokens", "2", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)  # fmt: skip


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)  # fmt: skip


# ---------------------------------------------------------------- the app


def _with_tokenizer_edited(tiny_original: Path, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the tiny model whose tokenizer.json is what `edit` makes of it (edited in place)."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_original, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def _redos_checkpoint(tiny_original: Path, tmp_path: Path) -> Path:
    """The tiny model with a pre-tokenizer regex that backtracks past Oniguruma's limit on "aaa…!"."""

    def redos(spec: dict) -> None:
        spec["pre_tokenizer"] = redos_pre_tokenizer(spec["pre_tokenizer"])

    return _with_tokenizer_edited(tiny_original, tmp_path, redos)


def test_a_tokenizer_panic_in_a_script_is_our_error_line_only(tiny_original, tmp_path):
    folder = _redos_checkpoint(tiny_original, tmp_path)
    script = tmp_path / "chat.txt"
    script.write_text("Hi.\n" + "a" * 40 + "!\nStill there?\n", encoding="utf-8")
    run = _app("--model", str(folder), "--script", str(script))
    assert run.returncode == 1
    assert run.stderr == "internvl-chat: 1 script line failed (line 2)\n"  # before: "thread '<unnamed>' panicked at …" and a backtrace
    assert "error: the checkpoint's tokenizer.json failed on this text" in run.stdout
    assert run.stdout.count("[stopped at max_new_tokens") == 2  # the turns before and after still answered


def _start_refused(folder: Path) -> str:
    """The app's stderr as it refuses to start on `folder` (exit 2): one line and nothing else."""
    run = _app("--model", str(folder), "-p", "hi")
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1, run.stderr
    return run.stderr


def test_a_tokenizer_json_that_panics_the_parser_is_one_line(tiny_original, tmp_path):
    def panics_to_build(spec: dict) -> None:
        spec["model"]["continuing_subword_prefix"] = "##"  # tokenizers panics building this BPE

    error = _start_refused(_with_tokenizer_edited(tiny_original, tmp_path, panics_to_build))
    assert error.startswith("internvl-chat: error: cannot read ") and "tokenizer.json" in error


def test_a_tokenizer_decoder_that_panics_on_the_start_probe_is_one_line(tiny_original, tmp_path):
    """The round-trip probe decodes at every start, and a decoder's Replace may be a regex: one that
    backtracks past Oniguruma's limit wrote the panic and a backtrace over the terminal before our line."""

    def backtracks_in_decoding(spec: dict) -> None:
        backtracks = {"type": "Replace", "pattern": {"Regex": r"^(\S+\s?)*$"}, "content": ""}
        spec["decoder"] = {"type": "Sequence", "decoders": [spec["decoder"], backtracks]}

    error = _start_refused(_with_tokenizer_edited(tiny_original, tmp_path, backtracks_in_decoding))
    assert error.startswith("internvl-chat: error: ") and "tokenizer.json fails on ordinary text" in error


def test_a_tokenizer_panic_in_the_repl_leaves_the_screen_to_our_error(tiny_original, tmp_path):
    """Before: Rust's "thread '<unnamed>' panicked at …" and its backtrace written over the prompt line."""
    import test_repl_pty as pty  # the module, not its names: its tests are not collected twice

    folder = _redos_checkpoint(tiny_original, tmp_path)
    repl = pty.Repl(tmp_path, folder, "--max-new-tokens", "2", env_extra={"RUST_BACKTRACE": "1"})
    repl.run("a" * 40 + "!", r"error: the checkpoint's tokenizer.json failed on this text")
    repl.child.expect_exact("a" * 40 + "!")  # the message failed before it was sent: offered back
    repl.child.sendcontrol("c")  # a fresh, empty line
    repl.prompt()
    repl.run("Still there?", pty.STATS)
    repl.enter("/exit")
    assert repl.close() == 0
    screen = repl.transcript.getvalue()
    assert "panicked" not in screen and "backtrace" not in screen and "onig" not in screen


def _tiff_libtiff_cannot_decode() -> bytes:
    """A deflate TIFF whose zlib checksum is wrong: libtiff prints its error to fd 2, Pillow raises
    "decoder error -2"."""
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(buf, format="TIFF", compression="tiff_deflate")
    data = bytearray(buf.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as image:
        offset, count = image.tag_v2[273][0], image.tag_v2[279][0]  # StripOffsets, StripByteCounts
    data[offset + count - 1] ^= 0xFF  # the last byte of the Adler-32 checksum
    return bytes(data)


def test_libtiffs_error_is_inside_our_one_line(tiny_original, tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(_tiff_libtiff_cannot_decode())
    run = _app("--model", str(tiny_original), "--image", str(path), "-p", "What is it?")
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr  # before: libtiff's own line first
    assert lines[0].startswith("internvl-chat: error: cannot decode ")
    assert "(decoder error -2: ZIPDecode: Decoding error at scanline 0, incorrect data check.)" in lines[0]


def _mp4_with_a_sample_past_the_end(path: Path) -> Path:
    """An MP4 whose sample table gives its fourth frame a size past the end of the file: PyAV
    decodes the others; decord 0.6 cannot open it and writes "ERROR opening: PATH, …" to fd 2."""
    write_numbered_video(path, 20)
    data = bytearray(path.read_bytes())
    stsz = data.find(b"stsz")
    assert stsz > 0 and struct.unpack(">I", data[stsz + 4 : stsz + 8])[0] == 0  # one size per sample follows
    data[stsz + 16 + 4 * 3] = 0xA6  # the top byte of the size of sample 3
    path.write_bytes(bytes(data))
    return path


def test_decords_own_line_is_not_printed_when_pyav_then_decodes_the_video(tiny_original, tmp_path):
    pytest.importorskip("decord")
    path = _mp4_with_a_sample_past_the_end(tmp_path / "clip\x1b[2J.mp4")  # decord printed the name raw
    run = _app("--model", str(tiny_original), "--video", str(path), "--frames", "2", "-p", "What happens?")
    assert run.returncode == 0, run.stderr
    assert "ERROR opening" not in run.stderr and "\x1b" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "the answer stopped at --max-new-tokens" not in line]
    # the stats line, and the note that the stream ends at the sample past the end (escaped, as the
    # file name is everywhere), besides the 2-token answer's length warning
    assert len(lines) == 2, run.stderr
    assert lines[0].startswith(f"internvl-chat: note: {visible(str(path))} holds only 3 of the 20 frames its header lists")


# ---------------------------------------------------------------- the module


def test_a_window_keeps_native_writes_and_lets_python_write_from_any_thread():
    run = _python("""
        import os, sys, threading
        from internvl_chat import native_stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        with native_stderr.captured() as outer:
            os.write(2, b"native one\\n")
            print("python, main thread", file=sys.stderr)
            def worker():
                with native_stderr.captured() as inner:
                    os.write(2, b"native two\\n")
                    print("python, worker", file=sys.stderr)
            thread = threading.Thread(target=worker)
            thread.start(); thread.join()
            os.write(2, b"native three\\n")  # the inner window closed; this one is still open
        os.write(2, b"fd 2 is back\\n")
        print(repr(outer.data), repr(outer.excerpt()))
    """)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "python, main thread\npython, worker\nfd 2 is back\n"
    assert run.stdout == "b'native one\\nnative two\\nnative three\\n' 'native one'\n"


def test_fd_2_comes_back_after_an_error_and_a_ctrl_c():
    run = _python("""
        import os, signal, sys
        from internvl_chat import native_stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        for error in (ValueError("bad file"), KeyboardInterrupt()):
            try:
                with native_stderr.captured() as window:
                    os.write(2, b"native\\n")
                    raise error
            except BaseException as e:
                print(type(e).__name__, repr(window.data))
            os.write(2, b"back\\n")
        try:
            with native_stderr.captured():
                signal.raise_signal(signal.SIGINT)  # a real Ctrl-C inside a window
        except KeyboardInterrupt:
            os.write(2, b"back after SIGINT\\n")
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ValueError b'native\\n'\nKeyboardInterrupt b'native\\n'\n"
    assert run.stderr == "back\nback\nback after SIGINT\n"


def test_without_the_apps_start_a_window_changes_nothing():
    """serve (whose uvicorn logs from other threads through fd 2) and library users keep every line."""
    run = _python("""
        import os
        from internvl_chat import native_stderr
        with native_stderr.captured() as window:
            os.write(2, b"native\\n")
        print(repr(window.data))
    """)
    assert (run.returncode, run.stdout, run.stderr) == (0, "b''\n", "native\n")


def test_an_excerpt_is_one_short_line():
    from internvl_chat.native_stderr import captured

    window = captured()
    window.data = b"\n  ZIPDecode:\tDecoding error \xff" + b"x" * 500 + b"\nsecond line\n"
    excerpt = window.excerpt()
    assert excerpt.startswith("ZIPDecode: Decoding error \ufffd") and excerpt.endswith("…") and len(excerpt) == 160



def test_a_window_still_open_when_the_app_drops_its_stderr_puts_fd_2_back():
    """cli.main() puts the original sys.stderr back on its way out, while a video worker may still
    be inside a window (Ctrl-C leaves it to finish its frame): the window must still find fd 2's
    terminal, not a closed descriptor or a file that took its number meanwhile."""
    run = _python("""
        import gc, os, sys, tempfile
        from internvl_chat import native_stderr
        original = sys.stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        window = native_stderr.captured()
        window.__enter__()
        sys.stderr = original
        gc.collect()
        other = tempfile.TemporaryFile()  # would take a freed descriptor's number
        window.__exit__(None, None, None)
        os.write(2, b"back\\n")
        other.seek(0)
        print(repr(other.read()))
    """)
    assert (run.returncode, run.stdout, run.stderr) == (0, "b''\n", "back\n")


@pytest.mark.parametrize("call, nth", [("dup2", 1), ("fstat", 2)], ids=["as-it-opens", "as-it-closes"])
def test_a_ctrl_c_just_as_a_window_opens_or_closes_puts_fd_2_back(call, nth):
    """The signal handler can run when any call inside the window's __enter__ or __exit__ returns
    (right after dup2 in __enter__, and `with` calls no __exit__ when __enter__ raises; as the sink's
    size is read in __exit__): fd 2 must be back and the window uncounted wherever it lands, or every
    later window would leave fd 2 on the sink for good."""
    run = _python(f"""
        import os, sys
        from internvl_chat import native_stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        real, calls = os.{call}, []
        def then_ctrl_c(*args):
            result = real(*args)
            calls.append(args)
            if len(calls) == {nth}:
                raise KeyboardInterrupt  # as Python's handler raises it at the call's return
            return result
        os.{call} = then_ctrl_c
        try:
            with native_stderr.captured():
                os.write(2, b"native\\n")
        except KeyboardInterrupt:
            pass
        os.write(2, b"back\\n")
        with native_stderr.captured():
            os.write(2, b"native again\\n")
        os.write(2, b"and back again\\n")
    """)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "back\nand back again\n")


@pytest.mark.parametrize("where", ["as-close-is-called", "in-the-lock-wait"])
def test_a_ctrl_c_before_a_closing_window_is_uncounted_puts_fd_2_back_and_still_arrives(where):
    """The handler can also run before __exit__ has uncounted the window: at the first instruction
    of the function it calls (modelled by raising there), or from the lock's acquire, which a
    real SIGINT interrupts while another thread's window holds the lock (modelled by sending one
    just before it). Before: the KeyboardInterrupt came through, the window stayed counted and fd 2
    stayed on the private file ("back" vanished)."""
    run = _python(f"""
        import os, signal, sys
        from internvl_chat import native_stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        armed = False
        if "{where}" == "as-close-is-called":
            close = native_stderr.captured._close
            def interrupted_close(self):
                global armed
                if armed:
                    armed = False
                    raise KeyboardInterrupt  # as Python's handler raises it at a function's start
                close(self)
            native_stderr.captured._close = interrupted_close
        else:
            lock = native_stderr._lock
            class InterruptedLock:
                def __enter__(self):
                    global armed
                    if armed:
                        armed = False
                        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C: its handler raises here
                    return lock.__enter__()
                def __exit__(self, *exc):
                    return lock.__exit__(*exc)
            native_stderr._lock = InterruptedLock()
        try:
            with native_stderr.captured():
                os.write(2, b"native\\n")
                armed = True
            print("no KeyboardInterrupt")
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        os.write(2, b"back\\n")
        with native_stderr.captured():
            os.write(2, b"native again\\n")
        os.write(2, b"and back again\\n")
    """)
    assert (run.returncode, run.stdout, run.stderr) == (0, "KeyboardInterrupt\n", "back\nand back again\n")


# A signal handler that raises at the first instruction of captured.__exit__ (or between the
# block's end and that call): no code in the window can close it. Modelled by an __exit__ that
# raises before doing anything, as Python's handler would raise there.
_SKIPPED_EXIT = """
    from internvl_chat import native_stderr
    skip = [{exception}]
    close = native_stderr.captured.__exit__
    def interrupted_exit(self, *exc):
        if skip:
            raise skip.pop()
        return close(self, *exc)
    native_stderr.captured.__exit__ = interrupted_exit
"""


def _skipping_exit(exception: str, code: str) -> str:
    return textwrap.dedent(_SKIPPED_EXIT.format(exception=exception)) + textwrap.dedent(code)


@pytest.mark.parametrize("exception", ["KeyboardInterrupt()", "SystemExit(143)"], ids=["ctrl-c", "sigterm"])
def test_a_window_whose_close_a_signal_skipped_is_closed_on_the_way_out_of_the_app(tiny_original, exception):
    """The one-shot run (script runs end the same way): the first window, around the tokenizer's
    load, is left open; cli.main's handler and clean-up run, then the process goes on, and what it
    writes to fd 2 must reach stderr. Before: "back" (and any later message of the interpreter's,
    through the original sys.stderr cli.main puts back) vanished into the private file."""
    run = _python(_skipping_exit(exception, f"""
        import os, sys
        from internvl_chat import cli
        os.environ["INTERNVL_CHAT_CONFIG"] = os.devnull
        try:
            code = cli.main(["--model", {str(tiny_original)!r}, "--device", "cpu", "-p", "hi"])
        except SystemExit as e:
            code = e.code
        print(code, skip)
        os.write(2, b"back\\n")
        print("python's stderr", file=sys.stderr)
    """))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ("130 []\n" if exception.startswith("Keyboard") else "143 []\n")
    assert run.stderr == ("internvl-chat: interrupted\n" if exception.startswith("Keyboard") else "") + "back\npython's stderr\n"


@pytest.mark.parametrize("where", ["raised", "caught-by-the-app"])
def test_a_window_whose_close_a_ctrl_c_skipped_is_closed_after_the_repls_input(where):
    """The REPL goes on after a Ctrl-C: through its own handler, or after the app caught it (a
    turn's, in App._answer). Before: fd 2 stayed on the private file for the rest of the session."""
    run = _python(_skipping_exit("KeyboardInterrupt()", f"""
        import os, sys
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        from internvl_chat.ui.repl import ReplSignals, _interruptible
        class App:
            def say(self, text, style=None):
                print(text)
        def turn():
            try:
                with native_stderr.captured():
                    os.write(2, b"native\\n")
            except KeyboardInterrupt:
                if "{where}" == "raised":
                    raise
                print("[cancelled]")
            return "ok"
        print(_interruptible(App(), ReplSignals(), turn))
        os.write(2, b"back\\n")
        with native_stderr.captured():
            os.write(2, b"native again\\n")
        os.write(2, b"and back again\\n")
    """))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ("[interrupted]\nNone\n" if where == "raised" else "[cancelled]\nok\n")
    assert run.stderr == "back\nand back again\n"


def test_leftover_windows_are_closed_only_in_the_thread_that_opened_them():
    """A video worker's window open meanwhile stays open (its frame's native messages are still
    kept) until it closes; a leftover closed again by a late __exit__ is not uncounted twice."""
    run = _python("""
        import os, sys, threading
        from internvl_chat import native_stderr
        sys.stderr = native_stderr.separate_python_stderr(sys.stderr)
        print(native_stderr.close_leftover_windows())  # none open: nothing to do
        opened, release = threading.Event(), threading.Event()
        def worker():
            with native_stderr.captured() as window:
                opened.set()
                release.wait(60)
            print(repr(window.data))
        thread = threading.Thread(target=worker)
        thread.start()
        opened.wait(60)
        leftover = native_stderr.captured()
        leftover.__enter__()  # its __exit__ skipped
        os.write(2, b"native one\\n")
        print(native_stderr.close_leftover_windows(), repr(leftover.data))
        os.write(2, b"native two\\n")  # the worker's window is still open
        release.set()
        thread.join()
        os.write(2, b"back\\n")
        leftover.__exit__(None, None, None)
        with native_stderr.captured():
            os.write(2, b"native three\\n")
        os.write(2, b"and back again\\n")
        print(native_stderr._open, len(native_stderr._windows))
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "0\n1 b'native one\\n'\nb'native one\\nnative two\\n'\n0 0\n"
    assert run.stderr == "back\nand back again\n"
