"""Non-interactive runs: `--script` transcripts, the scripted demo, and one-shot interruption."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.ui.script import read_entries
from media_helpers import textured_rgb
from app_helpers import ChunkedAnswers
from process_helpers import read_waiting, resume, stop

REPO = Path(__file__).resolve().parent.parent
ATTEMPTS = 5


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, **extra}
    env.pop("NO_COLOR", None)
    return env


def cli(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", *args], input=stdin, capture_output=True,
                          text=True, env=_env(), timeout=300, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script_media") / "photo.png"
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(path)
    return path


def test_read_entries_joins_triple_quote_blocks():
    script = '# comment\n\n/image a.png\nHello\n"""\nline 1\n\n# not a comment\n"""\n"""one"""\n/context\n'
    entries = list(read_entries(script))
    assert [(e.line_number, e.text) for e in entries] == [
        (3, "/image a.png"),
        (4, "Hello"),
        (5, '"""\nline 1\n\n# not a comment\n"""'),
        (10, '"""one"""'),
        (11, "/context"),
    ]


def test_an_unclosed_block_holds_the_lines_of_the_script_only():
    # the newline that ends the last line made one more, empty line: echoed as "... " in the transcript
    assert [e.lines for e in read_entries('Hello\n"""\nabc\n')] == [("Hello",), ('"""', "abc")]
    assert [e.lines for e in read_entries('"""\r\nabc\r\n\r\n')] == [('"""', "abc", "")]  # a blank line it has
    # a file saved with classic Mac line ends (CR alone) was one long message
    assert [e.text for e in read_entries("Hi\r/stats\r# note\rBye\r")] == ["Hi", "/stats", "Bye"]
    assert [e.lines for e in read_entries('"""\nabc')] == [('"""', "abc")]  # no newline at the end


def test_the_failed_lines_summary_names_the_first_few_and_counts_the_rest():
    # a script of 682 failing lines listed every number: one stderr line of 3,352 characters
    from internvl_chat.ui.script import failed_lines_note

    assert failed_lines_note([2]) == "1 script line failed (line 2)"  # not "1 script line(s)"
    assert failed_lines_note([2, 3, 4, 5, 6]) == "5 script lines failed (lines 2, 3, 4, 5, 6)"
    many = list(range(2, 684))
    assert failed_lines_note(many) == "682 script lines failed (lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 672 more)"


def test_read_entries_takes_a_system_message_block():
    script = '/system """\nBe brief.\n\nUse lists.\n"""\nHello\n/system """One line."""\n/context\n'
    assert [(e.line_number, e.text) for e in read_entries(script)] == [
        (1, '/system """\nBe brief.\n\nUse lists.\n"""'),
        (6, "Hello"),
        (7, '/system """One line."""'),
        (8, "/context"),
    ]


def test_read_entries_takes_a_set_system_message_block():
    # `/set system.message """` was one line: an unclosed-block error, then the lines meant for the
    # system message were sent to the model, and the closing quotes opened a block that took the rest
    script = '/set system.message """\nBe brief.\n"""\n/set System.Message  """\nUse lists.\n"""\n/context\n'
    assert [(e.line_number, e.text) for e in read_entries(script)] == [
        (1, '/set system.message """\nBe brief.\n"""'),
        (4, '/set System.Message  """\nUse lists.\n"""'),
        (7, "/context"),
    ]


def test_script_transcript_of_a_multi_turn_run(tiny_original, image, tmp_path):
    saved = tmp_path / "talk.json"
    script = tmp_path / "chat.txt"
    script.write_text(
        f"# a scripted conversation\n/image {image}\nWhat is in the picture?\n"
        '"""\nTell me more,\nin two lines.\n"""\n'
        f"/context\n/nosuch\n/undo\nAnd the colours?\n/stats\n/save {saved}\n"
    )
    run = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "8", "--script", str(script))
    assert run.returncode == 1, run.stderr  # /nosuch failed, the rest ran
    assert run.stderr.strip().splitlines()[-1] == "internvl-chat: 1 script line failed (line 9)"
    out = run.stdout.splitlines()
    expected_echoes = [
        f">>> /image {image}", ">>> What is in the picture?", '>>> """', "... Tell me more,", "... in two lines.",
        '... """', ">>> /context", ">>> /nosuch", ">>> /undo", ">>> And the colours?", ">>> /stats", f">>> /save {saved}",
    ]  # fmt: skip
    assert [line for line in out if line.startswith((">>> ", "... "))] == expected_echoes
    after = lambda echo: out[out.index(echo) + 1]  # noqa: E731  the line printed right after an echo
    assert after(f">>> /image {image}").startswith("+ image photo.png 900×450 → 3 tiles · 771 tokens · context")
    assert after(">>> /context").startswith("context: ")
    assert after(">>> /nosuch").startswith("error: unknown command /nosuch")
    assert after(">>> /undo") == "removed turn 2: “Tell me more, in two lines.” and its answer"
    assert after(">>> /stats").startswith("finish ")
    assert sum("decode" in line and "context" in line for line in out) == 3  # a stats line per answer
    data = json.loads(saved.read_text())
    assert [m["text"] for m in data["messages"] if m["role"] == "user"] == ["What is in the picture?", "And the colours?"]


def test_script_from_stdin_succeeds_and_exit_stops_it(tiny_original):
    run = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "4", "--no-stats", "--script", "-",
              stdin="Hello.\n/exit\nNever sent.\n")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert ">>> Hello." in run.stdout and ">>> /exit" in run.stdout and "Never sent" not in run.stdout
    assert "decode" not in run.stdout


def test_script_usage_errors_exit_2_before_loading(tmp_path):
    missing = cli("--model", "/nonexistent/model", "--script", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "none.txt does not exist" in missing.stderr
    both = cli("--script", "-", "-p", "hi")
    assert both.returncode == 2 and "--script" in both.stderr


_STDIN_NOT_READ = ("internvl-chat: warning: stdin is not read with --script FILE (its lines are the messages); put the "
                   'text in the script (inside a """ block), or pipe the script itself: --script -')


def test_text_piped_to_a_script_file_is_said_not_dropped_silently(tmp_path):
    # `cat notes.txt | internvl-chat --script s.txt`: the notes never reached a message, and nothing said so
    script, notes = tmp_path / "s.txt", tmp_path / "notes.txt"
    script.write_text("Summarise the notes.\n", encoding="utf-8")
    notes.write_text("The meeting moved to Friday.\n", encoding="utf-8")

    def run(*args: str, stdin) -> list[str]:
        # a model that is not there: the run ends at its load, after the script is read and stdin looked at
        done = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tmp_path / "no-model"), *args],
                              stdin=stdin, capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
        assert done.returncode == 2 and "no-model" in done.stderr.splitlines()[-1], done.stderr
        return done.stderr.splitlines()[:-1]

    with open(notes, "rb") as stdin:  # `< notes.txt`
        assert run("--script", str(script), stdin=stdin) == [_STDIN_NOT_READ]
    read_end, write_end = os.pipe()  # `cat notes.txt |`: the text waits in the pipe before the program starts
    os.write(write_end, notes.read_bytes())
    os.close(write_end)
    try:
        assert run("--script", str(script), stdin=read_end) == [_STDIN_NOT_READ]
    finally:
        os.close(read_end)
    assert run("--script", str(script), stdin=subprocess.DEVNULL) == []  # nothing piped: nothing said
    with open(script, "rb") as stdin:  # the script is stdin, read by name: nothing was left unread
        assert run("--script", "/dev/stdin", stdin=stdin) == []


def test_unread_bytes_counts_what_waits_without_reading_it(tmp_path):
    from internvl_chat.files import unread_bytes

    path = tmp_path / "notes.txt"
    path.write_bytes(b"12345")
    with open(path, "rb", buffering=0) as f:
        assert unread_bytes(f.fileno()) == 5
        f.read(2)
        assert unread_bytes(f.fileno()) == 3  # a redirected file: what is left after the offset
    read_end, write_end = os.pipe()
    try:
        assert unread_bytes(read_end) == 0
        os.write(write_end, b"abc")
        assert unread_bytes(read_end) == 3 and os.read(read_end, 10) == b"abc"  # counting took nothing
    finally:
        os.close(read_end)
        os.close(write_end)
    with open(os.devnull, "rb") as null:
        assert unread_bytes(null.fileno()) == 0


def test_the_scripted_demo_runs_from_any_folder(tiny_original, tmp_path):
    # a copy of the repository's layout: examples/demo.txt and .cache/demo/ made as `make demo` does
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "demo.txt", tmp_path / "examples" / "demo.txt")
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_media.py"), "--out-dir", ".cache/demo/"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert Image.open(tmp_path / ".cache/demo/scene.png").size == (640, 400)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # neither the repository root nor the script's folder
    run = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "6",
              "--script", str(tmp_path / "examples" / "demo.txt"), cwd=elsewhere)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert ">>> /image ../.cache/demo/scene.png\n+ image scene.png 640×400 → " in out
    questions = [line for line in out.splitlines() if line.startswith(">>> ") and not line.startswith(">>> /")]
    assert len(questions) >= 2
    assert ">>> /context\ncontext: " in out and ">>> /stats\nfinish " in out


def test_oneshot_interrupted_exits_130(tiny_original):
    """Ctrl-C (SIGINT) while the answer streams: status 130, one line on stderr. The tiny model's
    answer can end before a busy machine delivers the signal, so the program is stopped once the
    answer has started, and signalled only if its stats line (written after the answer) is not out
    yet; a run whose answer had already ended is dropped and a new one started."""
    for _ in range(ATTEMPTS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu",
             "--max-new-tokens", "3000", "-p", "Tell me a very long story."],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        )  # fmt: skip
        try:
            out = os.read(proc.stdout.fileno(), 1)  # the answer has started streaming
            assert out
            stop(proc.pid)
            out += read_waiting(proc.stdout.fileno())
            err = read_waiting(proc.stderr.fileno())
            if b"tok/s" not in err:  # still answering: the signal lands mid-answer
                proc.send_signal(signal.SIGINT)
                resume(proc.pid)
                rest, more = proc.communicate(timeout=120)
                break
        finally:
            proc.kill()
            proc.wait()
    else:
        raise AssertionError(f"the answer ended before the program could be stopped, {ATTEMPTS} times")
    err = (err + more).decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "internvl-chat: interrupted"
    assert "decode" not in (out + rest).decode(errors="replace")  # stdout holds only (part of) the answer


def test_a_line_that_is_not_utf8_fails_alone_and_the_script_goes_on(tiny_original, tmp_path):
    script = tmp_path / "mixed.txt"
    script.write_bytes(b"Hello.\nCaf\xe9 au lait?\n\x1b[2J/context\n/context\n")
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu",
                          "--max-new-tokens", "4", "--no-stats", "--script", str(script)],
                         capture_output=True, env=_env(), timeout=300)  # fmt: skip
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 1, err
    assert ">>> Caf\\xe9 au lait?\nerror: line 2 is not UTF-8 text (byte 0xe9); save the script as UTF-8" in out
    assert "\x1b" not in out and ">>> \\e[2J/context" in out  # echoed inert; it is a message, not a command
    assert out.count("context: ") == 1  # the last line still ran
    assert err.strip().splitlines()[-1] == "internvl-chat: 1 script line failed (line 2)"


def test_a_script_that_is_an_image_a_fifo_or_a_device_is_refused_in_one_line(image, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    # a session file given as a script sent each of its JSON lines to the model as a message
    session = tmp_path / "chat.json"
    session.write_text('{\n "format": "internvl-chat-session",\n "version": 1,\n "messages": []\n}\n')
    run = cli("--script", str(session))
    assert run.returncode == 2 and run.stderr.strip() == (
        f"internvl-chat: error: the script {session} is a session file saved with /save, not REPL lines; "
        f"load it with /load {session} (in the REPL, or as a script line)")
    # a pipe (`--script <(…)`) names the way that reads one: it said "save it to a file first"
    wide = tmp_path / "notepad.txt"  # its NUL bytes read as "binary data … attach pictures with /image"
    wide.write_bytes("/context\nHello.\n".encode("utf-16"))
    for path, expected in ((image, "is a PNG image, not text"), (fifo, "is a pipe, not a file; give the script on stdin instead: --script -"),
                           (Path("/dev/zero"), "is not a regular file"),
                           (wide, "is UTF-16 text, not UTF-8; save it as UTF-8 (iconv -f UTF-16 -t UTF-8)")):  # fmt: skip
        run = cli("--script", str(path))
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], run.stderr


def test_a_full_stdout_still_runs_the_script_to_its_end_and_saves(tiny_original, tmp_path):
    saved = tmp_path / "talk.json"
    script = tmp_path / "chat.txt"
    script.write_text(f"Hello.\n/save {saved}\n")
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu",
                              "--max-new-tokens", "4", "--script", str(script)], stdout=full, stderr=subprocess.PIPE,
                             text=True, env=_env(), timeout=300)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip() == "internvl-chat: error: cannot write to stdout (No space left on device); the output is incomplete"
    assert json.loads(saved.read_text())["messages"][0]["text"] == "Hello."  # nothing the script saves is lost


NO_SUCH_USER = "~no-such-user-internvl-chat"  # `~user` of an account that does not exist


def test_a_path_under_an_unknown_users_home_fails_its_line_and_the_script_goes_on(tiny_original, tmp_path):
    script = tmp_path / "tilde.txt"
    script.write_text(f"Hello.\n/image {NO_SUCH_USER}/a.png\n/video {NO_SUCH_USER}/a.mp4\n/save {NO_SUCH_USER}/a.json\n"
                      f"/load {NO_SUCH_USER}/a.json\n/export {NO_SUCH_USER}/a.md\n/context\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu",
                          "--max-new-tokens", "4", "--no-stats", "--script", str(script)],
                         capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 1, run.stderr
    assert run.stdout.count("there is no user 'no-such-user-internvl-chat'") == 5, run.stdout
    assert not (tmp_path / NO_SUCH_USER).exists() and not Path(NO_SUCH_USER).exists()  # no folder named ~user
    assert "context: " in run.stdout  # the conversation went on after the failed lines
    assert run.stderr.strip().splitlines()[-1] == "internvl-chat: 5 script lines failed (lines 2, 3, 4, 5, 6)"


@pytest.mark.parametrize("flag", ["--script", "--config"])
def test_a_script_or_config_under_an_unknown_users_home_exits_2_in_one_line(flag):
    run = cli(flag, f"{NO_SUCH_USER}/file", *(["-p", "hi"] if flag == "--config" else []))
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "there is no user" in lines[0], run.stderr


# a cursor move, an erasure, a cursor hidden or shown, autowrap off or on, a carriage return: what
# only a terminal undoes (colours, `ESC [ … m`, are not among them)
_SCREEN_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-HJKSTfhl]|\r")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def test_a_transcript_in_colour_has_no_spinner_or_live_tail(monkeypatch, tmp_path):
    # ui.color = always made the console a terminal: every frame of the spinner and of the answer's
    # live tail, with the cursor moves and erasures between them, went into the transcript
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    answer = ["# Shapes\n\n", "There are ", "**two** shapes: a star ", "and a tri", "angle.\n\n", "- star\n", "- triangle"]
    monkeypatch.setattr(script, "open_conversation", lambda settings: ChunkedAnswers(answer))
    monkeypatch.setattr(script, "media_from_flags", lambda session, args, settings: [])
    path = tmp_path / "chat.txt"
    path.write_text("How many shapes are there?\n", encoding="utf-8")
    out = tmp_path / "transcript.txt"
    settings = load_settings(os.devnull, env={}, overrides={"ui.color": "always", "ui.stats": False})
    with open(out, "w", encoding="utf-8") as file:
        monkeypatch.setattr(sys, "stdout", file)
        assert script.run_script(argparse.Namespace(script=str(path)), settings) == 0
    transcript = out.read_text(encoding="utf-8")
    assert _COLOUR.search(transcript)  # the colours asked for
    assert not _SCREEN_CONTROL.search(transcript), repr(transcript)
    shown = _COLOUR.sub("", transcript)
    assert [line.strip() for line in shown.splitlines()] == [  # each line once: no frames
        ">>> How many shapes are there?", "Shapes", "", "There are two shapes: a star and a triangle.", "",
        "• star", "• triangle"]  # fmt: skip


def test_set_plain_off_after_plain_brings_colours_and_markdown_back_into_a_file(monkeypatch, tmp_path):
    # with ui.color = always and --plain, the console was made as no terminal for good: `/set plain
    # off` brought back neither colours nor Markdown (and `on` again must leave no escapes at all)
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    answers = [["**One** star.\n"], ["**Two** stars.\n"], ["**Three** stars.\n"]]
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(script, "open_conversation", lambda settings: ChunkedAnswers(*answers))
    monkeypatch.setattr(script, "media_from_flags", lambda session, args, settings: [])
    path = tmp_path / "chat.txt"
    path.write_text("Count.\n/set plain off\nCount again.\n/set plain on\nOnce more.\n", encoding="utf-8")
    out = tmp_path / "transcript.txt"
    settings = load_settings(os.devnull, env={}, overrides={"ui.color": "always", "ui.plain": True, "ui.stats": False})
    with open(out, "w", encoding="utf-8") as file:
        monkeypatch.setattr(sys, "stdout", file)
        assert script.run_script(argparse.Namespace(script=str(path)), settings) == 0
    text = out.read_text(encoding="utf-8")
    off, on = text.index("ui.plain = false"), text.index("ui.plain = true")
    plain_start, markdown, plain_again = text[:off], text[off:on], text[on:]
    assert "**One** star." in plain_start and not _COLOUR.search(plain_start)
    assert _COLOUR.search(markdown) and "**" not in markdown and "Two stars." in _COLOUR.sub("", markdown)
    assert not _SCREEN_CONTROL.search(markdown)  # a file given colours: still no live tail
    assert "**Three** stars." in plain_again and "\x1b" not in plain_again


@pytest.mark.parametrize("ending, ended", [
    ("", "the script ended before one; add a message line after them"),
    # it said "the script ended before one" though /bye ended it
    ("/bye\n", "/bye came before one; add a message line between them and /bye"),
    ("/exit\n# a comment\n", "/exit came before one; add a message line between them and /exit"),
])
def test_attachments_the_script_never_sent_are_named_in_a_warning(loaded, image, monkeypatch, capsys, tmp_path, ending, ended):
    # a script that ended right after /image (or /exit) dropped the picture without a word, status 0
    from internvl_chat.chat.sampling import params_from_settings
    from internvl_chat.chat.session import Session
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    settings = load_settings(os.devnull, env={}, overrides={"generation.max_new_tokens": 4, "ui.stats": False,
                                                            "media.max_tiles": 1})
    monkeypatch.setattr(script, "open_conversation", lambda settings: Session(loaded, params=params_from_settings(settings)))
    monkeypatch.setattr(script, "media_from_flags", lambda session, args, settings: [])
    shutil.copy(image, tmp_path / "second.png")
    path = tmp_path / "chat.txt"
    path.write_text(f"/image {image}\nHello.\n/image {image}\n/image second.png\n{ending}", encoding="utf-8")
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 0  # no line failed: /context users
    run = capsys.readouterr()
    assert ">>> Hello." in run.out and "warning" not in run.out
    assert run.err == ("internvl-chat: warning: 2 attachments were never sent (photo.png, second.png): attachments go "
                       f"with the next message, and {ended}\n")  # fmt: skip

    path.write_text(f"/image {image}\nHello.\n", encoding="utf-8")  # all sent: nothing said
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 0
    assert capsys.readouterr().err == ""


def test_attachments_whose_message_failed_are_named_as_such(loaded, image, monkeypatch, capsys, tmp_path):
    """The message after /image failed (here: too long for the context), so the picture was never
    sent; the warning said "the script ended before one" though a message line came after it."""
    from internvl_chat.chat.sampling import params_from_settings
    from internvl_chat.chat.session import Session
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    settings = load_settings(os.devnull, env={}, overrides={"generation.max_new_tokens": 4, "ui.stats": False,
                                                            "media.max_tiles": 1})
    monkeypatch.setattr(script, "open_conversation", lambda settings: Session(loaded, params=params_from_settings(settings)))
    monkeypatch.setattr(script, "media_from_flags", lambda session, args, settings: [])
    long = "word " * 40000
    path = tmp_path / "chat.txt"
    path.write_text(f"/image {image}\n{long}\n/context\n", encoding="utf-8")
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 1
    err = capsys.readouterr().err
    assert err.startswith("internvl-chat: warning: 1 attachment was never sent (photo.png): the message on line 2 "
                          "that would take it failed (its error says why)\n"), err  # fmt: skip
    assert "the script ended before one" not in err
    # a message failed, then another came and took the picture: nothing to say
    path.write_text(f"/image {image}\n{long}\nHello.\n", encoding="utf-8")
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 1
    assert "never sent" not in capsys.readouterr().err
    # another picture attached after the failed message: no message came for that one either
    shutil.copy(image, tmp_path / "second.png")
    path.write_text(f"/image {image}\n{long}\n/image second.png\n", encoding="utf-8")
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 1
    assert capsys.readouterr().err.startswith("internvl-chat: warning: 2 attachments were never sent (photo.png, "
                                              "second.png): the message on line 2 failed (its error says why), and the "
                                              "script ended before another\n")  # fmt: skip
    # a message failed before the picture was attached: the script still ended before one took it
    path.write_text(f"{long}\n/image {image}\n", encoding="utf-8")
    assert script.run_script(argparse.Namespace(script=str(path)), settings) == 1
    assert "the script ended before one; add a message line after it" in capsys.readouterr().err


def test_a_truncated_image_flag_is_refused_before_the_script_runs(loaded, image, monkeypatch, capsys, tmp_path):
    # its header passed, the script's first message failed as the picture was decoded, the rest went on without it
    from internvl_chat.chat.sampling import params_from_settings
    from internvl_chat.chat.session import Session
    from internvl_chat.errors import MediaError
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    settings = load_settings(os.devnull, env={}, overrides={"generation.max_new_tokens": 4, "ui.stats": False})
    monkeypatch.setattr(script, "open_conversation", lambda settings: Session(loaded, params=params_from_settings(settings)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    path = tmp_path / "chat.txt"
    path.write_text("What is it?\n", encoding="utf-8")
    args = argparse.Namespace(script=str(path), image=[str(cut)], video=[], video_range=None)
    with pytest.raises(MediaError, match=r"^cannot decode .*cut\.png: the file is truncated or corrupt \(.*\); re-export") as err:
        script.run_script(args, settings)
    assert "\n" not in str(err.value) and ">>> What is it?" not in capsys.readouterr().out
    args.image = [str(image)]  # a whole one is attached and sent
    assert script.run_script(args, settings) == 0 and "+ image photo.png" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only a comment\n\n# and another\n", "\ufeff\r\n"])
def test_a_script_with_nothing_to_run_is_a_usage_error_before_the_model_loads(monkeypatch, tmp_path, content):
    # it loaded the model, printed nothing and ended with status 0
    from internvl_chat.errors import UsageError
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import script

    monkeypatch.setattr(script, "open_conversation", lambda settings: pytest.fail("the model was loaded"))
    path = tmp_path / "chat.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as err:
        script.run_script(argparse.Namespace(script=str(path)), load_settings(os.devnull, env={}))
    assert str(err.value) == (f"the script {path} holds no messages or commands (only blank lines and # comments); "
                              "nothing was sent; write REPL lines in it, one a line")  # fmt: skip
    assert err.value.exit_code == 2


def test_an_empty_script_exits_2_with_one_line_on_stderr(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    run = cli("--script", "empty.txt", cwd=tmp_path)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == "internvl-chat: error: the script empty.txt holds no messages or commands " \
                         "(only blank lines and # comments); nothing was sent; write REPL lines in it, one a line\n"
    run = cli("--script", "-", stdin="\n# nothing\n", cwd=tmp_path)  # as an empty piped prompt is refused
    assert run.returncode == 2 and run.stderr.startswith("internvl-chat: error: the script on stdin holds no messages")


def test_non_ascii_media_paths_under_the_c_locale_name_their_files(tmp_path):
    # LC_ALL=C without UTF-8 mode: Python names files as ASCII, but a script's (and a prompt's)
    # text is UTF-8; a message naming "nö.png" was a UnicodeEncodeError traceback, and
    # `/image nö.png` said the file does not exist
    Image.fromarray(textured_rgb(64, 48, seed=3)).save(tmp_path / "nö.png")
    (tmp_path / "chat.txt").write_text("/image nö.png\nwhat is nö.png?\n", encoding="utf-8")
    env = {**_env(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")}
    env.pop("PYTHONIOENCODING", None)
    for argv in (["--script", "chat.txt"], ["-p", "what is nö.png?"]):
        run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--max-new-tokens", "2", *argv], capture_output=True,
                             stdin=subprocess.DEVNULL, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
        assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    assert b"does not exist" not in run.stdout


def test_typed_paths_become_the_file_systems_names_under_an_ascii_locale(monkeypatch):
    from internvl_chat.ui import paths

    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    assert paths.normalize_path("nö.png") == Path("n\udcc3\udcb6.png")  # os.fsencode gives the UTF-8 bytes back
    assert paths.normalize_path("plain.png") == Path("plain.png")
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "utf-8")
    assert paths.normalize_path("nö.png") == Path("nö.png")


def test_a_session_saved_under_utf8_loads_its_non_ascii_media_under_the_c_locale(tmp_path):
    # the session file holds "nö.png" as text; under LC_ALL=C without UTF-8 mode Python could not
    # name that file (a UnicodeEncodeError inside exists()), and /load said it "has vanished"
    Image.fromarray(textured_rgb(64, 48, seed=3)).save(tmp_path / "nö.png")
    (tmp_path / "save.txt").write_text("/image nö.png\nhi\n/save chat.json\n", encoding="utf-8")
    (tmp_path / "load.txt").write_text("/load chat.json\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--max-new-tokens", "2", "--script", "save.txt"],
                         capture_output=True, stdin=subprocess.DEVNULL, env=_env(), timeout=300, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    env = {**_env(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--script", "load.txt"], capture_output=True,
                         stdin=subprocess.DEVNULL, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0 and b"vanished" not in run.stdout, run.stdout.decode(errors="replace")
