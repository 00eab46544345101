"""The REPL end to end in a real pseudo-terminal (pexpect), against the tiny checkpoint.

Keys are sent as a terminal sends them: Enter is "\\r", Ctrl-C goes through the terminal driver
(`sendintr`), so SIGINT reaches the program exactly as when a person presses it. The checks wait
for stable markers (the app's own lines, prompt_toolkit's "bracketed paste on" when a prompt is
ready), never for a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import sys
import time
from pathlib import Path

import pexpect
import pytest
from PIL import Image
from prompt_toolkit.document import Document

from internvl_chat.ui.repl import ChatCompleter
from media_helpers import textured_rgb, write_numbered_video
from process_helpers import interrupt_stopped, resume, stop
from remote_helpers import FakeServer, Reply, fixture

REPO = Path(__file__).resolve().parent.parent
PROMPT_READY = "\x1b[?2004h"  # prompt_toolkit turns bracketed paste on when it waits for input
INPUT_DONE = "\x1b[?2004l"  # … and off when a line is accepted
STATS = r"decode [\d.,]+ tok/s · context [\d,]+/[\d,]+ \(\d+ %\)"
# an answer cancelled after its first token has no decode rate to show (format_stats): the
# stats line then starts at the context (a Ctrl-C landing that early failed the test at times)
STATS_AFTER_CANCEL = r"(?:decode [\d.,]+ tok/s · )?context [\d,]+/[\d,]+ \(\d+ %\)"
TIMEOUT = 300  # generous: a loaded 2-core CI machine can stall a child for minutes; a pass never waits for it


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("repl_media")
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(d / "small.png")  # 3 tiles
    Image.fromarray(textured_rgb(2000, 2000, seed=6)).save(d / "big.png")  # 12 tiles + thumbnail
    write_numbered_video(d / "clip.mp4", num_frames=20, fps=10)
    (d / "notes.txt").write_text("not media")
    (d / "My Pics").mkdir()
    (d / "My Pics" / "cat.jpg").write_bytes(b"")
    return d


def pty_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment the REPL runs in under a pseudo-terminal: this checkout, no config file,
    `home` as HOME (and, with XDG_STATE_HOME unset, where its state goes), `extra` on top."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "INTERNVL_CHAT_CONFIG": os.devnull,
        "HOME": str(home),
        "TERM": "xterm-256color",
        "NO_COLOR": "1",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # nobody answers cursor-position requests here
        **extra,
    }
    env.pop("XDG_STATE_HOME", None)
    return env


class Repl:
    def __init__(self, home: Path, model: Path | None, *args: str, env_extra: dict | None = None):
        """`model` None: the embedded demo model."""
        env = pty_env(home, **(env_extra or {}))
        argv = ["-m", "internvl_chat.cli", *(["--model", str(model)] if model else []), "--device", "cpu", *args]
        self.child = pexpect.spawn(sys.executable, argv, env=env, dimensions=(50, 220), encoding="utf-8",
                                   timeout=TIMEOUT, cwd=str(home))  # fmt: skip
        self.record()
        self.child.expect_exact(PROMPT_READY)

    def record(self) -> None:
        """Keep all the program wrote, for the messages of failed checks."""
        self.transcript = io.StringIO()
        self.child.logfile_read = self.transcript

    def type(self, text: str) -> None:
        self.child.send(text)

    def enter(self, line: str) -> None:
        """Type a line, press Enter, wait until it is accepted."""
        self.child.send(line + "\r")
        self.child.expect_exact(INPUT_DONE)

    def expect(self, pattern: str) -> str:
        self.child.expect(pattern)
        return self.child.match.group(0)

    def prompt(self) -> None:
        self.child.expect_exact(PROMPT_READY)

    def run(self, line: str, pattern: str) -> str:
        self.enter(line)
        found = self.expect(pattern)
        self.prompt()
        return found

    def interrupt_answer(self, question: str, attempts: int = 5) -> None:
        """Ask `question`, press Ctrl-C while its answer streams and see "[cancelled: the partial
        answer is kept". The program is stopped once the answer shows, and Ctrl-C pressed only if
        the stats line (written after the answer) is not out yet, so it is acted on as the program
        goes on. The answer can still have ended first (a busy machine can take its whole length
        to look; a remote answer can have arrived whole while the program was to show it), or the
        character seen not be the answer's: then the Ctrl-C came too late (or too early) to cancel
        an answer, is spent, and the question is asked again."""
        for _ in range(attempts):
            self.enter(question)
            # the first visible character of the answer, past any escape sequences
            self.expect(r"\A(?:\x1b\[[0-9;?]*[A-Za-z]|\s)*[^\s\x1b]")
            stop(self.child.pid)
            seen = self.child.after + self.child.buffer
            while True:  # everything it wrote (a stopped program writes nothing more)
                try:
                    seen += self.child.read_nonblocking(65536, timeout=1)
                except pexpect.TIMEOUT:
                    break
            ended = "tok/s" in seen
            if not ended:
                interrupt_stopped(self.child)  # pending while it is stopped: handled first thing after
            resume(self.child.pid)
            if not ended:
                outcomes = [r"\[cancelled: the partial answer is kept", r"tok/s", r"\[interrupted\]",
                            r"\[interrupted: ", r"\[cancelled before the answer began",
                            r"\[interrupted while printing: the answer is kept"]  # fmt: skip
                try:
                    outcome = self.child.expect(outcomes)
                except pexpect.TIMEOUT:
                    raise AssertionError(f"no outcome of Ctrl-C; before it: {seen[-2000:]!r}; "
                                         f"after it: {self.child.before[-2000:]!r}; "
                                         f"all it wrote: {self.transcript.getvalue()[-4000:]!r}") from None  # fmt: skip
                if outcome == 0:
                    return
                ended = outcome in (1, 2, 5)  # the answer was kept (with or without its stats line); else nothing was
            if PROMPT_READY not in seen:
                self.prompt()
            if ended:
                self.run("/undo", r"removed turn")
        raise AssertionError(f"the answer ended before Ctrl-C could cancel it, {attempts} times")

    def close(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def test_chat_cancel_undo_retry_video_and_errors(tiny_original, media, tmp_path):
    repl = Repl(tmp_path, tiny_original, "--max-context", "3072", "--max-new-tokens", "40", "--plain")

    # attach, see the cost before anything runs, ask: the answer streams and the stats line follows
    repl.run(f"/image {media / 'small.png'}", r"\+ image small\.png 900×450 → 3 tiles · 771 tokens · context \d+ %")
    repl.run("What is in the picture?", r"vision [\d.]+ s · prefill [\d,]+ tok .*" + STATS)

    # errors: one line each, and the REPL goes on
    repl.run(f"/image {media / 'big.png'}", r"error: cannot attach big\.png: .*larger --max-context")
    repl.run("/image /nonexistent/cat.png", r"error: .*/nonexistent/cat\.png does not exist")
    repl.run("/imgae", r"error: unknown command /imgae; did you mean /image\?")

    # Ctrl-C at the prompt clears the line
    repl.type("half a line")
    repl.child.sendintr()
    repl.prompt()
    repl.run("/media", r"nothing attached")

    # Ctrl-C in the middle of an answer: the partial answer is kept, marked, and the chat goes on
    repl.run("/set max_new_tokens 1500", r"generation\.max_new_tokens = 1500")
    repl.interrupt_answer("Describe the picture in detail.")  # --plain: no spinner before the answer
    repl.expect(STATS_AFTER_CANCEL)
    repl.prompt()
    repl.run("/set max_new_tokens 40", r"= 40")
    repl.run("And now something else.", STATS)
    repl.run("/undo", r"removed turn 3: “And now something else\.”")
    repl.run("/retry", STATS)

    # a video with its cost line, then a question about it
    repl.run(f"/video {media / 'clip.mp4'} --frames 4", r"\+ video clip\.mp4 4 frames of 2\.0 s → [\d,]+ tokens · context \d+ %")
    repl.run("What happens in the video?", r"vision [\d.]+ s .*" + STATS)
    repl.run(f"/save {tmp_path / 'talk.json'}", r"saved 3 turns")
    repl.enter("/exit")
    assert repl.close() == 0

    saved = json.loads((tmp_path / "talk.json").read_text())
    users = [m for m in saved["messages"] if m["role"] == "user"]
    answers = [m for m in saved["messages"] if m["role"] == "assistant"]
    assert [m["text"] for m in users] == ["What is in the picture?", "Describe the picture in detail.",
                                            "What happens in the video?"]
    assert [[x["kind"] for x in m["media"]] for m in users] == [["image"], [], ["video"]]
    assert answers[1]["finish_reason"] in ("stop", "length")  # /retry replaced the cancelled answer
    assert len(answers[1]["token_ids"]) <= 40

    history = tmp_path / ".local" / "state" / "internvl-chat" / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "/undo" in history.read_text() and "half a line" not in history.read_text()


def _conversation(markdown: str) -> str:
    return markdown[markdown.index("## ") :]  # without the header (it holds the export time)


def test_markdown_multiline_completion_and_save_load_in_a_new_process(tiny_original, media, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    editor = tmp_path / "editor.sh"  # an "editor" that writes the message into the file it is given
    editor.write_text("#!/bin/sh\nprintf 'Edited in the editor.' > \"$1\"\n")
    editor.chmod(0o755)
    repl = Repl(home, tiny_original, "--max-new-tokens", "24", env_extra={"EDITOR": str(editor), "VISUAL": str(editor)})

    # Tab completes the command, then the path (only images are offered for /image)
    repl.type("/ima\t")
    repl.expect(r"/ima(?:\x1b\[[0-9;?]*[A-Za-z])*ge")  # the completion may be drawn apart from what was typed
    repl.type(f"{media}/sm\t")
    repl.expect(r"all\.png")  # the rest of small.png, filled in
    repl.enter("")
    repl.expect(r"\+ image small\.png 900×450")
    repl.prompt()

    # a """ block is one message; Markdown streaming on a terminal, then the stats line
    repl.type('"""\r')
    repl.type("first line\r")
    repl.type("second line\r")
    repl.enter('"""')
    repl.expect(STATS)
    repl.prompt()
    # Alt+Enter (Esc Enter) and Ctrl-J add lines instead of sending
    repl.run("abc\x1b\rdef\nghi", STATS)
    # Ctrl-X Ctrl-E: the buffer goes to $EDITOR, and what the editor leaves is sent
    repl.type("draft")
    repl.child.sendcontrol("x")
    repl.child.sendcontrol("e")
    repl.expect(STATS)
    repl.prompt()
    repl.run(f"/save {tmp_path / 'talk.json'}", r"saved 3 turns")
    repl.run("Go on.", STATS)
    repl.run(f"/export {tmp_path / 'one.md'}", r"exported 4 turns")
    repl.child.sendcontrol("d")
    assert repl.close() == 0

    saved = json.loads((tmp_path / "talk.json").read_text())
    users = [m["text"] for m in saved["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "abc\ndef\nghi", "Edited in the editor."]

    # a new process loads the conversation and continues it exactly as the first one did
    home2 = tmp_path / "home2"
    home2.mkdir()
    repl = Repl(home2, tiny_original, "--max-new-tokens", "24", "--no-history")
    repl.run(f"/load {tmp_path / 'talk.json'}", r"loaded 3 turns")
    repl.run("Go on.", STATS)
    repl.run(f"/export {tmp_path / 'two.md'}", r"exported 4 turns")
    repl.enter("/quit")
    assert repl.close() == 0
    one, two = (tmp_path / "one.md").read_text(), (tmp_path / "two.md").read_text()
    assert _conversation(one) == _conversation(two)
    assert not (home2 / ".local" / "state" / "internvl-chat" / "history").exists()


def test_term_dumb_gets_the_plain_prompt(tmp_path):
    """TERM=dumb (an editor's shell buffer) gets prompt_toolkit's plain prompt: no bracketed paste,
    no cursor moves. Handing the prompt an output of its own (for stdout piped) had lost it."""
    child = pexpect.spawn(sys.executable, ["-m", "internvl_chat.cli", "--device", "cpu", "--no-history"],
                          env=pty_env(tmp_path, TERM="dumb"), dimensions=(50, 220), encoding="utf-8",
                          timeout=TIMEOUT, cwd=str(tmp_path))  # fmt: skip
    child.logfile_read = transcript = io.StringIO()
    child.expect_exact("Ctrl-D, /exit or /bye quits")
    _wait_for_the_prompt_to_read_keys(child)  # keys sent before came as a cooked line (no timing)
    child.send("/help help\r")
    child.expect_exact("show the commands, or the usage of one")
    _wait_for_the_prompt_to_read_keys(child)
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "> /help help" in transcript.getvalue() and PROMPT_READY not in transcript.getvalue(), transcript.getvalue()


def _wait_for_the_prompt_to_read_keys(child: pexpect.spawn) -> None:
    """Until prompt_toolkit has the terminal in raw mode (Ctrl-C no signal; typeahead.py's hold
    keeps it one): the plain prompt is written before, and keys sent between were a cooked line
    whose Enter came as a newline."""
    import termios

    for _ in range(TIMEOUT * 100):  # a bound only: each pass reads the modes, a pass never waits for it
        if not termios.tcgetattr(child.child_fd)[3] & termios.ISIG:
            return
        assert child.isalive(), "the REPL ended before its prompt read keys"
        time.sleep(0.01)
    raise AssertionError("the prompt never put the terminal in raw mode")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_at_the_plain_prompt_ends_the_repl_as_at_the_full_one(tmp_path, signame):
    """SIGTERM or SIGHUP while the plain prompt (TERM=dumb) waits for keys was acted on only once a
    line was entered: the prompt runs an Application of its own, which the REPL's handlers never
    woke. It ends the REPL at once, as at the full prompt: status 128 + the signal, the terminal's
    modes put back, no traceback."""
    import signal
    import termios

    sig = getattr(signal, signame)
    child = pexpect.spawn(sys.executable, ["-m", "internvl_chat.cli", "--device", "cpu", "--no-history"],
                          env=pty_env(tmp_path, TERM="dumb"), dimensions=(50, 220), encoding="utf-8",
                          timeout=TIMEOUT, cwd=str(tmp_path))  # fmt: skip
    child.logfile_read = transcript = io.StringIO()
    try:
        child.expect_exact("Ctrl-D, /exit or /bye quits")
        _wait_for_the_prompt_to_read_keys(child)
        child.kill(sig)
        child.expect(pexpect.EOF)  # no key typed: the timeout is only a guard against a hang
        lflag = termios.tcgetattr(child.child_fd)[3]  # the pty's modes, as the next program finds them
    finally:
        child.close(force=True)
    assert child.exitstatus == 128 + sig, transcript.getvalue()
    assert lflag & termios.ECHO and lflag & termios.ICANON and lflag & termios.ISIG
    assert "Traceback" not in transcript.getvalue(), transcript.getvalue()

def _escapes(drawn: str) -> bool:
    """Whether `drawn` holds escape sequences besides "show the cursor", which prompt_toolkit writes
    once as a prompt session is made, its plain prompt too."""
    return "\x1b" in drawn.replace("\x1b[?12l\x1b[?25h", "")


def test_term_dumb_with_stdout_piped_gets_the_plain_prompt_on_stderr(tmp_path):
    """`TERM=dumb internvl-chat -I | tee log`: the prompt went to stderr drawn as for a full
    terminal (cursor moves, bracketed paste), as handing it stderr had lost the plain prompt."""
    log = tmp_path / "log.txt"
    command = f"exec {shlex.quote(sys.executable)} -m internvl_chat.cli --device cpu --no-history -I > {shlex.quote(str(log))}"
    child = pexpect.spawn("/bin/sh", ["-c", command], env=pty_env(tmp_path, TERM="dumb"), dimensions=(50, 220),
                          encoding="utf-8", timeout=TIMEOUT, cwd=str(tmp_path))  # fmt: skip
    child.logfile_read = transcript = io.StringIO()
    try:
        drawn = child.expect_exact(["> ", PROMPT_READY])  # the plain prompt's text, or the full prompt starting
        assert drawn == 0 and not _escapes(transcript.getvalue()), transcript.getvalue()  # only the prompt's text on stderr
        _wait_for_the_prompt_to_read_keys(child)
        child.send("/help help\r")
        child.expect_exact("/help help")  # the keys echoed one by one after the prompt
        child.expect_exact("\n> ")  # the line ended, the next prompt (the answer went to the log)
        _wait_for_the_prompt_to_read_keys(child)
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert not _escapes(transcript.getvalue()) and "> /help help" in transcript.getvalue(), transcript.getvalue()
    shown = log.read_text()
    assert "show the commands, or the usage of one" in shown and "> " not in shown, shown  # the log: answers, no prompt


@pytest.mark.parametrize("leave", ["ctrl-d", "/exit"])
def test_quitting_with_attachments_not_sent_names_them(media, tmp_path, leave):
    # Ctrl-D or /exit at a `[+2] >` prompt dropped the pictures without a word (a script said it)
    repl = Repl(tmp_path, None, "--no-history", "--plain")
    repl.run(f"/image {media / 'small.png'} {media / 'big.png'}", r"\+ image big\.png")
    if leave == "ctrl-d":
        repl.child.sendcontrol("d")
    else:
        repl.enter("/exit")
    repl.expect(r"warning: 2 attachments were never sent \(small\.png, big\.png\): attachments go with the next "
                r"message, and you quit before one")  # fmt: skip
    assert repl.close() == 0  # no question asked: quitting is still one key


# --- completion (no terminal needed) ------------------------------------------------------------


def _complete(text: str, cwd: Path | None = None) -> list[str]:
    return [c.text for c in ChatCompleter(cwd).get_completions(Document(text), None)]


def test_completion_of_commands_settings_and_values():
    assert _complete("/ima") == ["/image "]
    assert set(_complete("/")) >= {"/help ", "/video ", "/export ", "/quit "}
    assert _complete("/set temp") == ["temperature"]
    assert "generation.top_p" in _complete("/set gen")
    assert _complete("/set stats ") == ["true", "false"]
    assert _complete("/set temperature ") == []
    assert _complete("/video clip.mp4 --fr") == ["--frames"]
    assert _complete("/help vi") == ["video"]
    assert _complete("/clear ") == []


def test_completion_of_paths_filters_by_kind(media, tmp_path):
    listing = lambda text: sorted(_complete(text))  # noqa: E731
    assert listing(f"/image {media}/") == sorted([f"{media}/My\\ Pics/", f"{media}/big.png", f"{media}/small.png"])
    assert listing(f"/video {media}/") == sorted([f"{media}/My\\ Pics/", f"{media}/clip.mp4"])
    assert f"{media}/notes.txt" in listing(f"/save {media}/")
    assert listing(f"/image {media}/My\\ Pics/") == [f"{media}/My\\ Pics/cat.jpg"]
    assert listing(f"/image '{media}/My Pics/c") == [f"'{media}/My Pics/cat.jpg'"]
    assert listing(f"what is {media}/sm") == [f"{media}/small.png"]  # media paths inside a message
    assert _complete("relative/pic", cwd=media) == []  # a message word that does not look like a path
    assert _complete("/image sm", cwd=tmp_path) == []  # relative to the working folder, which has none
    assert _complete("/image sm", cwd=media) == ["small.png"]


def test_completion_menu_shows_odd_file_names_escaped(tmp_path):
    """A listed file name is untrusted: the menu shows its controls as escapes, so a name cannot
    write to the terminal; one holding a bidi override (`evil\u202egnp.exe.png`, posing as another)
    is not offered at all (test_repl_completion.py)."""
    for name in ["evil\u202egnp.exe.png", "t\x1b]0;X\x07.png"]:
        (tmp_path / name).write_bytes(b"")
    shown = sorted(c.display_text for c in ChatCompleter(tmp_path).get_completions(Document("/image ./"), None))
    assert shown == ["t\\e]0;X\\x07.png"]
    assert sorted(_complete("/image ./", cwd=tmp_path)) == ["./t\x1b]0;X\x07.png"]  # the real name


# --- Ctrl-C just after Enter (no terminal needed) -------------------------------------------------


@pytest.mark.parametrize("sequence", ["\x1b[31m", "\x1b[1;2;3;4M", "\x1b[Mxyz"],
                         ids=["colour code", "four numbers", "unknown button"])  # fmt: skip
def test_an_escape_sequence_typed_as_keys_is_dropped_without_a_traceback(sequence):
    """Keys that read as a mouse report (a colour code typed or pasted where the terminal does not
    bracket pastes, or the reports another program left switched on) reached prompt_toolkit's own
    mouse handler, which raised on the malformed ones: "Unhandled exception in event loop", a
    traceback, "Press ENTER to continue..." eating the next keys. They are dropped now, and the
    line goes on."""
    import asyncio

    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from internvl_chat.ui.repl import key_bindings

    with create_pipe_input() as pipe:
        session = PromptSession(input=pipe, output=DummyOutput(), key_bindings=key_bindings())
        pipe.send_text(f"red{sequence} text\r")

        async def prompt() -> str:
            def raised(loop, context) -> None:  # instead of a traceback and "Press ENTER to continue..."
                session.app.exit(exception=AssertionError(f"a key handler raised: {context.get('exception')!r}"))

            asyncio.get_running_loop().set_exception_handler(raised)
            return await session.prompt_async("> ", set_exception_handler=False)

        assert asyncio.run(asyncio.wait_for(prompt(), 60)) == "red text"


def test_a_ctrl_c_that_reaches_the_prompt_after_enter_cancels_the_line_without_a_traceback():
    """A Ctrl-C pressed right after Enter lands in prompt_toolkit's event loop, which runs the
    `<sigint>` key after the prompt has returned. The stock handler then raised "Application is not
    running" (printed as a traceback) and the Ctrl-C was lost; now it marks the line cancelled."""
    import asyncio

    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from internvl_chat.ui.repl import LateInterrupt, key_bindings

    late = LateInterrupt()
    with create_pipe_input() as pipe:
        session = PromptSession(input=pipe, output=DummyOutput(), key_bindings=key_bindings(late))
        pipe.send_text("hello\r")
        assert session.prompt("> ") == "hello"

        async def late_callback() -> None:  # what the loop runs while asyncio.run winds down
            session.app.key_processor.send_sigint()

        asyncio.run(late_callback())
        assert late.pressed
        late.pressed = False
        pipe.send_text("again")
        with pytest.raises(KeyboardInterrupt):  # while the prompt runs: Ctrl-C as before
            session.prompt("> ", pre_run=lambda: session.app.key_processor.send_sigint())
        assert not late.pressed


# --- signals around the prompt (no terminal needed) -------------------------------------------------


@pytest.fixture
def repl_signals():
    """The REPL's signal handlers, installed in this process for the test and removed after it."""
    import signal

    from internvl_chat.ui.repl import ReplSignals

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)}
    signals = ReplSignals()
    signals.install()
    yield signals
    for s, handler in previous.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def _prompt_session(screen):
    """(pipe, session): a PromptSession reading keys from the pipe and drawing into `screen`."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output.vt100 import Vt100_Output

    with create_pipe_input() as pipe:
        output = Vt100_Output(screen, lambda: Size(rows=24, columns=80), term="xterm")
        yield pipe, PromptSession(input=pipe, output=output)


@pytest.fixture
def noise(capfd, monkeypatch):
    """Call it to assert that nothing but the app's own output appeared: no traceback from the
    event loop, no "Exception ignored in …" (a half-built event loop, when collected), no
    "coroutine … was never awaited" warning."""
    import gc
    import warnings

    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"Exception ignored in {u.object!r}: {u.exc_value!r}"))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")

        def check(screen: str) -> None:
            gc.collect()
            printed = capfd.readouterr()
            found = [screen, printed.out, printed.err, *unraisable, *(str(w.message) for w in warned)]
            for text in found:
                for bad in ("Unhandled exception", "Press ENTER", "Exception ignored", "Traceback", "never awaited"):
                    assert bad not in text, text

        yield check


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_signal_that_lands_inside_the_prompts_event_loop_ends_it_cleanly(signum, repl_signals, noise):
    """SIGTERM or SIGHUP at the prompt used to raise SystemExit wherever the signal landed: inside
    one of prompt_toolkit's tasks it became "Unhandled exception in event loop", a traceback,
    "Press ENTER to continue..." and a terminal left raw (about one kill in six). Here it lands in
    a task of the prompt's loop every time."""
    import asyncio
    import io
    import signal

    sig = getattr(signal, signum)
    screen = io.StringIO()

    async def kill_from_inside() -> None:
        os.kill(os.getpid(), sig)
        await asyncio.sleep(0)  # the handler runs here, in the loop's task

    with _prompt_session(screen) as (pipe, session), pytest.raises(SystemExit) as ended:
        session.app.pre_run_callables.append(lambda: session.app.create_background_task(kill_from_inside()))
        repl_signals.prompt(session, "> ")
    assert ended.value.code == 128 + sig
    noise(screen.getvalue())
    shown = screen.getvalue()
    assert shown.rfind(INPUT_DONE) > shown.rfind(PROMPT_READY)  # the prompt was closed: bracketed paste off


def test_a_ctrl_c_while_the_prompt_builds_its_event_loop_clears_the_line_quietly(repl_signals, noise, monkeypatch):
    """Ctrl-C pressed twice quickly: the second SIGINT can land while asyncio.run builds the next
    prompt's event loop; the KeyboardInterrupt raised there left a half-built loop that printed
    "Exception ignored in BaseEventLoop.__del__ … AttributeError" and "coroutine … was never
    awaited" over the screen. Here the SIGINT lands in that constructor every time."""
    import io
    import selectors
    import signal
    from asyncio import selector_events

    real = selectors.DefaultSelector

    def selector_while_ctrl_c_is_pressed():
        os.kill(os.getpid(), signal.SIGINT)
        return real()

    monkeypatch.setattr(selector_events.selectors, "DefaultSelector", selector_while_ctrl_c_is_pressed)
    screen = io.StringIO()
    with _prompt_session(screen) as (pipe, session), pytest.raises(KeyboardInterrupt):  # the line is cleared
        repl_signals.prompt(session, "> ")
    monkeypatch.setattr(selector_events.selectors, "DefaultSelector", real)
    noise(screen.getvalue())
    assert not repl_signals.interrupted


def test_a_ctrl_c_between_a_command_and_the_next_prompt_clears_that_prompt(repl_signals, noise):
    """A Ctrl-C after a command's work, before the next prompt was up (pressed twice quickly, or
    just as the command ended), raised KeyboardInterrupt out of the REPL's loop: the program
    ended ("internvl-chat: interrupted", status 130) and the conversation with it."""
    import io
    import signal

    with repl_signals.raising(), pytest.raises(KeyboardInterrupt):  # during a command: it stops it
        os.kill(os.getpid(), signal.SIGINT)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # between two steps of the REPL: nothing is raised
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C between a command and the prompt ended the REPL")
    assert repl_signals.interrupted
    screen = io.StringIO()
    with _prompt_session(screen) as (pipe, session):
        with pytest.raises(KeyboardInterrupt):  # … the next prompt starts with an empty line
            repl_signals.prompt(session, "> ", default="typed ahead")
        assert not repl_signals.interrupted
        pipe.send_text("hello\r")
        assert repl_signals.prompt(session, "> ") == "hello"  # and the REPL goes on
    noise(screen.getvalue())



def _job_control_shell(home: Path) -> pexpect.spawn:
    """An interactive bash in a pty: Ctrl-Z stops its foreground job, `fg` continues it. (Without
    a shell's job control, the kernel ignores a stop signal sent to the program.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(home),
           "TERM": "xterm-256color", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1", "PS1": "SHELL$ "}  # fmt: skip
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env, dimensions=(50, 220), encoding="utf-8",
                          timeout=TIMEOUT, cwd=str(home))  # fmt: skip
    shell.expect_exact("SHELL$ ")
    return shell


def _start_in(shell: pexpect.spawn, *flags: str) -> None:
    """The REPL started from `shell` (--no-history, `flags`), at its first prompt."""
    command = [sys.executable, "-m", "internvl_chat.cli", "--no-history", *flags]
    shell.send(" ".join(shlex.quote(word) for word in command) + "\r")
    shell.expect_exact(PROMPT_READY)


def _stop_and_fg(shell: pexpect.spawn) -> None:
    shell.sendcontrol("z")
    assert shell.expect([r"Stopped", r"\^Z"]) == 0, "Ctrl-Z did not stop the program"
    shell.expect_exact("SHELL$ ")
    shell.send("fg\r")
    shell.expect_exact("internvl_chat.cli")  # bash names the job it continues, its own line editing over


def _modes(child: pexpect.spawn) -> dict[str, bool]:
    import termios

    lflag = termios.tcgetattr(child.child_fd)[3]
    return {"echo": bool(lflag & termios.ECHO), "line editing": bool(lflag & termios.ICANON),
            "Ctrl-C": bool(lflag & termios.ISIG)}  # fmt: skip


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_ctrl_z_at_the_prompt_suspends_and_fg_resumes_with_the_line_kept(tiny_original, tmp_path):
    """Ctrl-Z at the prompt used to type a literal ^Z (0x1a) into the message, which was then sent
    to the model with it; a shell user expects the program to stop until `fg`."""
    shell = _job_control_shell(tmp_path)
    _start_in(shell, "--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "8")
    shell.send("abc")
    shell.expect_exact("abc")
    _stop_and_fg(shell)
    shell.expect_exact("> abc")  # the prompt is drawn again, with the line kept
    shell.send("\r")
    shell.expect(r"tok/s")
    shell.expect_exact(PROMPT_READY)
    shell.send(f"/save {shlex.quote(str(tmp_path / 'talk.json'))}\r")
    shell.expect(r"saved 1 turn")
    shell.expect_exact(PROMPT_READY)
    shell.sendcontrol("d")
    shell.expect_exact("SHELL$ ")
    shell.send("echo status=$?\r")
    shell.expect(r"status=(\d+)")
    assert shell.match.group(1) == "0"
    shell.sendline("exit")
    shell.expect(pexpect.EOF)
    users = [m["text"] for m in json.loads((tmp_path / "talk.json").read_text())["messages"] if m["role"] == "user"]
    assert users == ["abc"]


def _words(text: str) -> bytes:
    return b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % text.encode()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_after_ctrl_z_and_fg_mid_answer_typed_keys_are_still_held(tmp_path):
    """Ctrl-Z while an answer streams stops the program and the shell puts its own modes on the
    terminal; after `fg` the answer went on in cooked mode, so keys typed then were echoed into
    it. Now the quiet modes come back on SIGCONT (echo and line editing off, Ctrl-C on). The
    answer is held at the server, its words sent one at a time when the test says (the tiny
    model's answer could end before a busy test looked): a word sent after `fg` and shown means
    the program has run since SIGCONT."""
    later = [_words(f" w{i:02d}.") for i in range(20)]
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[_words("Once upon a time")], held=[_words(" there was a fox."), *later], end="hang"))
        shell = _job_control_shell(tmp_path)
        _start_in(shell, "--server", server.url, "--plain")
        shell.send("Tell me a long story.\r")
        shell.expect_exact(INPUT_DONE)
        shell.expect_exact("Once upon a time")  # the answer streams, and waits for the server
        _stop_and_fg(shell)
        server.go_on.release()
        shell.expect_exact("there was a fox.")
        assert _modes(shell) == {"echo": False, "line editing": False, "Ctrl-C": True}
        shell.sendcontrol("c")
        # the answer stops between two pieces (the signal itself lands a moment later): words are
        # sent one at a time until it has
        for i in range(len(later)):
            server.go_on.release()
            if shell.expect_exact(["[cancelled", f"w{i:02d}."]) == 0:
                break
        else:
            raise AssertionError(f"Ctrl-C did not cancel the answer in {len(later)} more words")
        shell.expect_exact(PROMPT_READY)
        shell.sendcontrol("d")
        shell.expect_exact("SHELL$ ")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)


def test_ctrl_c_ends_an_answer_whose_server_went_silent(tmp_path):
    """The first Ctrl-C keeps the partial answer, but it was looked at only when the next piece
    came: a server gone silent held it until the read timed out, and then the answer was lost."""
    config = tmp_path / "config.toml"
    config.write_text("[remote]\ntimeout = 60\n")  # the wait a Ctrl-C used to end in
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[_words("Once upon a time")], end="hang"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "TERM": "xterm-256color",
               "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip
        argv = ["-m", "internvl_chat.cli", "--server", server.url, "--config", str(config), "--no-history", "--plain"]
        child = pexpect.spawn(sys.executable, argv, env=env, dimensions=(50, 220), encoding="utf-8",
                              timeout=TIMEOUT, cwd=str(tmp_path))  # fmt: skip
        child.expect_exact(PROMPT_READY)
        child.send("Tell me a long story.\r")
        child.expect_exact(INPUT_DONE)
        child.expect_exact("Once upon a time")  # then nothing more comes
        child.sendintr()
        assert child.expect_exact(["[cancelled: the partial answer is kept", "error:"]) == 0, child.buffer
        child.expect_exact(PROMPT_READY)
        child.send("/context\r")
        child.expect(r"turn 1: “Tell me a long story\.” \(answer [\d,]+\)")
        child.expect_exact(PROMPT_READY)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def _cursor_shown(output: str) -> bool:
    """Whether the terminal's cursor is visible after `output` (the last show/hide sequence wins)."""
    return output.rfind("\x1b[?25h") > output.rfind("\x1b[?25l")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_ctrl_z_while_the_spinner_shows_leaves_the_cursor_visible(tmp_path):
    """rich's spinner hides the cursor until it stops; a Ctrl-Z while it spun left the shell
    (and anything run there before `fg`) without a cursor. The answer is held at the server, so
    the spinner ("thinking …") is up for as long as the test needs."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[], end="hang"))  # headers, then nothing until the test releases it
        shell = _job_control_shell(tmp_path)
        shell.logfile_read = seen = io.StringIO()
        _start_in(shell, "--server", server.url)
        shell.send("Hello\r")
        shell.expect_exact(INPUT_DONE)
        shell.expect_exact("thinking")
        assert not _cursor_shown(seen.getvalue())  # the spinner hid it
        shell.sendcontrol("z")
        shell.expect(r"Stopped")  # (a "^Z" the terminal echoes may come first: not a failure)
        shell.expect_exact("SHELL$ ")
        assert _cursor_shown(seen.getvalue()), "the shell got a hidden cursor"
        shell.send("fg\r")
        shell.expect_exact("internvl_chat.cli")
        shell.expect_exact("\x1b[?25l")  # spinning again: hidden again
        server.release.set()  # the server ends the answer without a word: one error line, the prompt
        shell.expect(r"error")
        shell.expect_exact(PROMPT_READY)
        assert _cursor_shown(seen.getvalue())
        shell.expect_exact("Hello")  # no turn was kept: the prompt starts with the message again
        shell.sendcontrol("c")  # a fresh, empty line, where Ctrl-D quits
        shell.expect_exact(PROMPT_READY)
        shell.sendcontrol("d")
        shell.expect_exact("SHELL$ ")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)


def _autowrap_on(output: str) -> bool:
    """Whether the terminal wraps long lines after `output` (the last DECAWM set/reset wins)."""
    return output.rfind("\x1b[?7h") >= output.rfind("\x1b[?7l")


def _finish(reason: str = "stop") -> bytes:
    return b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "%s"}]}\n\ndata: [DONE]\n\n' % reason.encode()


def test_the_last_words_before_a_server_pauses_are_drawn(tmp_path):
    """Words that come faster than the live region redraws (1/15 s) are drawn by the next one;
    the last of them, with the server then silent, stayed off the screen until more came (here:
    never, as the server waits for the test to see them). The server sends 40 words at once and
    holds the end of the answer."""
    words = [f" w{i:02d}" for i in range(40)]
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[_words("Counting:"), *map(_words, words)], held=[_finish()], end="hang"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "TERM": "xterm-256color",
               "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip
        argv = ["-m", "internvl_chat.cli", "--server", server.url, "--no-history"]
        child = pexpect.spawn(sys.executable, argv, env=env, dimensions=(50, 220), encoding="utf-8",
                              timeout=TIMEOUT, cwd=str(tmp_path))  # fmt: skip
        child.expect_exact(PROMPT_READY)
        child.send("Count.\r")
        child.expect_exact(INPUT_DONE)
        child.expect_exact("w39")  # drawn with nothing more from the server
        server.go_on.release()
        child.expect_exact(PROMPT_READY)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_ctrl_z_while_an_answer_streams_leaves_the_cursor_visible_and_fg_draws_it_again(tmp_path):
    """The answer's live region hides the cursor while it is up; a Ctrl-Z mid-answer left the
    shell without a cursor, and the region's rows under the shell's lines. Now the region is
    erased and the cursor (and autowrap) back on before the program stops; after `fg` the cursor
    is hidden again, the region drawn again below the shell's lines and the answer goes on. The
    answer is held at the server: its unfinished paragraph (two rows) stays live until the test
    lets the rest go."""
    story = "Once upon a time" + " there was a long sentence that went on." * 8
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[_words(story)], held=[_words(" The end."), _finish()]))
        shell = _job_control_shell(tmp_path)
        shell.logfile_read = seen = io.StringIO()
        _start_in(shell, "--server", server.url)
        shell.send("Tell me a long story.\r")
        shell.expect_exact(INPUT_DONE)
        shell.expect_exact("went on.")  # the paragraph so far, in the live region
        assert not _cursor_shown(seen.getvalue())  # the live region hid it
        shell.sendcontrol("z")
        assert shell.expect([r"Stopped", r"\^Z"]) == 0, "Ctrl-Z did not stop the program"
        shell.expect_exact("SHELL$ ")
        assert _cursor_shown(seen.getvalue()), "the shell got a hidden cursor"
        assert _autowrap_on(seen.getvalue()), "the shell got a terminal that does not wrap lines"
        shell.send("fg\r")
        shell.expect_exact("internvl_chat.cli")
        shell.expect_exact("\x1b[?25l")  # hidden again …
        shell.expect_exact("went on.")  # … and the paragraph drawn again, before any more of it came
        server.go_on.release()
        shell.expect_exact("The end.")  # the answer goes on in the region
        assert not _cursor_shown(seen.getvalue())
        server.go_on.release()
        shell.expect_exact(PROMPT_READY)
        assert _cursor_shown(seen.getvalue()) and _autowrap_on(seen.getvalue())
        shell.sendcontrol("d")
        shell.expect_exact("SHELL$ ")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)

    import pyte

    screen = pyte.Screen(220, 50)
    pyte.Stream(screen).feed(seen.getvalue())
    shown = "\n".join(line.rstrip() for line in screen.display)
    assert shown.count("Once upon a time") == 1, shown  # no rows of the region left above the shell's lines
    assert "Stopped" in shown and story + " The end." in " ".join(shown.split())  # the whole answer, once


@pytest.mark.parametrize("locale", [{"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, {"PYTHONIOENCODING": "ascii"}],
                         ids=["C locale", "ascii io"])  # fmt: skip
def test_tab_completes_a_non_ascii_name_under_an_ascii_locale_into_a_line_that_attaches_it(tmp_path, locale):
    """Under LC_ALL=C without UTF-8 mode Tab offered nothing for "nö.png" (listed with surrogates,
    taken for a name that is not UTF-8); the name completed, Enter attaches that file. The spinner
    spins ASCII frames and the attachment line shows ASCII glyphs, no escapes."""
    home = tmp_path / "home"
    home.mkdir()
    Image.new("RGB", (64, 48), "red").save(home / "n\u00f6.png")
    repl = Repl(home, None, "--no-history", env_extra={"PYTHONIOENCODING": "", **locale})  # "": the locale's
    try:
        repl.type("/image n\t")
        # the completion is drawn before Enter: Tab's completion runs as a task of the event loop, so
        # an Enter read with it (a busy machine runs the child after both keys came) sent "/image n"
        repl.expect(r"\.png")
        repl.enter("")
        repl.expect(r"\+ image n\S*\.png 64x48 -> ")  # the name escaped (\xf6): no ASCII glyph would do
        repl.prompt()
    finally:
        repl.child.sendeof()
        repl.child.expect(pexpect.EOF)
    assert not re.search(r"\\u[0-9a-f]{4}", repl.transcript.getvalue()), repl.transcript.getvalue()
