"""Text for the terminal: lines that fit its width, /set, the banner, typed paths, type-ahead.

In process, against the tiny checkpoint where a model is needed. The widths 40, 60 and 80 are
checked line by line: nothing is longer than the width, words and numbers are never cut.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pyte
import pytest
from PIL import Image
from prompt_toolkit.document import Document
from rich.cells import cell_len

from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.ui.app import EXIT, ERROR, OK
from internvl_chat.ui.commands import COMMANDS, format_help
from internvl_chat.ui.media_paths import take_media_paths
from internvl_chat.ui.summary_lines import format_stats
from internvl_chat.numbers import counted
from internvl_chat.ui.text_wrap import format_columns, wrap_text
from internvl_chat.ui.repl import ChatCompleter
from internvl_chat.ui.set_keys import runtime_keys
from internvl_chat.ui.setup import EMBEDDED_MODEL
from internvl_chat.ui.typeahead import held_keys, keys_released, typed_text
from media_helpers import textured_rgb
from screen_model import ReflowScreen
from app_helpers import ChunkedAnswers, make_app, output


class FakeStdout(io.StringIO):
    """A stdout that is a terminal or not, as `tty` says."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (40, 60, 80)
NUMBER = re.compile(r"\d[\d,.]*\d|\d")
TIMING = {"vision_s": 0.41, "prefill_tokens": 12310, "prefill_s": 12310 / 5120, "ttft_s": 2.52,
          "decode_tokens": 413, "decode_s": 10.0, "decode_tokens_per_s": 41.3}  # fmt: skip


def numbers_in(text: str) -> list[str]:
    return NUMBER.findall(text)


def assert_fits(text: str, width: int, original: str | None = None) -> None:
    for line in text.split("\n"):
        assert cell_len(line) <= width, (width, line)  # a CJK character takes two cells
    if original is not None:  # the same words, in the same order, nothing cut
        assert text.split() == original.split() or " ".join(text.split()) == " ".join(original.split())
        assert numbers_in(text) == numbers_in(original)


# --- wrapping ----------------------------------------------------------------------------------

LONG = ("error: cannot attach big.png: the turn would need 13,000 tokens (3,328 of them for 13 tiles) but the "
        "context holds 8,192 of which 2,480 (30 %) are used after 12.5 s; /drop N removes an attachment, "
        "or start again with a larger --max-context such as 16,384 or 32,768")  # fmt: skip


@pytest.mark.parametrize("width", WIDTHS)
def test_wrap_breaks_at_spaces_and_never_splits_a_number(width):
    wrapped = wrap_text(LONG, width)
    assert_fits(wrapped, width, LONG)
    assert len(wrapped.split("\n")) > 1
    for line in wrapped.split("\n")[1:]:
        assert line.startswith("  ") and not line.startswith("   ")  # a hanging indent
    assert not re.search(r"\d\n\s*(%|s\b)", wrapped)  # a unit stays with its number
    assert wrap_text(LONG, None) == LONG  # not a terminal: the line stays whole


def test_wrap_cuts_only_a_word_longer_than_the_line():
    path = "/very/long/path/" + "x" * 70 + ".png"
    wrapped = wrap_text(f"error: {path} does not exist", 40)
    assert_fits(wrapped, 40)
    assert re.sub(r"\s", "", wrapped) == f"error:{path}doesnotexist"
    assert wrap_text("short", 40) == "short" and wrap_text("a  b\n  c", 40) == "a  b\n  c"
    assert_fits(wrap_text("中文" * 30, 40), 40)  # wide characters count two cells each


@pytest.mark.parametrize("width", [30, 40, 60, 80, 200])
def test_stats_line_fits_by_dropping_the_least_wanted_fields(width):
    full = format_stats(TIMING, {}, 2480, 8192, int(1.2 * 2**30), "cuda:0")
    line = format_stats(TIMING, {}, 2480, 8192, int(1.2 * 2**30), "cuda:0", width=width)
    assert len(line) <= width
    assert line.startswith("decode 41.3 tok/s") or "decode 41.3 tok/s" in line  # always kept
    for field in line.split(" · "):  # what is shown is shown whole
        assert field in full or field == "context 30 %"
    if width >= len(full):
        assert line == full
    assert format_stats(TIMING, {}, 2480, 8192, None, "cpu", width=40) == "decode 41.3 tok/s · context 30 %"


@pytest.mark.parametrize("width", WIDTHS)
def test_help_fits_and_lists_every_command(width):
    text = format_help(None, width)
    assert_fits(text, width)
    for spec in COMMANDS:
        assert spec.usage in text  # a usage is never broken, even /video's at 40 columns
        assert " ".join(spec.help.split()) in " ".join(text.split())
    for name in ("video", "set", "exit"):
        assert_fits(format_help(name, width), width)
    assert format_help(None) == format_help(None, None)  # no terminal: one line per command


@pytest.mark.parametrize("width", WIDTHS)
def test_columns_fit_and_keep_the_numbers_aligned(width):
    rows = [("system message", "17"), ("turn 1: image a-picture-with-a-long-name.png, “What is in the picture?” "
            "(media 771 · answer 40)", "1,851"), ("turn 2: “照片里有什么东西？请详细描述一下”", "96"),
            ("reserved for the answer (max_new_tokens)", "1,024")]  # fmt: skip
    text = format_columns(rows, width, indent=2, align_right=True)
    assert_fits(text, width)
    ends = [line for line in text.split("\n") if re.search(r"\d$", line)]
    assert len(ends) == 4 and len({cell_len(line) for line in ends}) == 1  # right-aligned numbers
    assert sorted(numbers_in(text)) == sorted(n for label, value in rows for n in numbers_in(label + " " + value))


# --- the app -----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
def test_everything_the_app_prints_fits_a_terminal(loaded, tmp_path, width):
    app, out = make_app(loaded, tmp_path, width=width, terminal=True)
    app.banner()
    for line in ["/help", "/help video", "Hello there, who are you?", "/context", "/stats", "/media",
                 "/set", "/set temperature", "/set temprature 1", f"/image {tmp_path}/a/b/c/no-such-picture-anywhere.png",
                 "/show"]:  # fmt: skip
        app.handle_line(line)
    screen = ReflowScreen(width, 400)  # what a terminal shows; it marks the rows it had to wrap
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
    wrapped = [row for y, row in enumerate(screen.display) if getattr(screen.buffer[y], "wrapped", False)]
    assert not wrapped
    text = "\n".join(screen.display)
    words = " ".join(text.split())
    assert "tok/s" in words and "at most, after the next answer" in words and "did you mean 'temperature'" in words


def test_set_shows_a_value_and_its_source_and_echoes_as_the_config_file(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/set stats") == OK
    assert out.getvalue() == "ui.stats = true  (from default)\n"
    assert app.handle_line("/set markdown false") == OK and "ui.markdown = false\n" in out.getvalue()
    assert "False" not in out.getvalue()
    app.handle_line("/set markdown")
    assert out.getvalue().endswith("ui.markdown = false  (from /set)\n")
    app.handle_line("/set temperature 0.5")
    assert out.getvalue().endswith("generation.temperature = 0.5\n")
    app.handle_line("/set seed")
    assert out.getvalue().endswith("generation.seed = (not set)  (from default)\n")
    app.handle_line("/set system.message 'Be brief.\x1b[2J'")
    app.handle_line("/set system.message")
    assert out.getvalue().endswith('system.message = "Be brief.\\u001b[2J"  (from /system)\n')  # TOML, no escape code


def test_set_never_shows_a_key_or_a_servers_password(loaded, tmp_path):
    # `/set remote.api_key` printed the key (into a script's transcript too), and /show, --print-config
    # and /save gave the user:password of a server URL
    app, out = make_app(loaded, tmp_path, **{"remote.api_key": "sk-live-1", "serve.api_key": "sk-live-2"})
    app.settings.set("remote.server", "http://alice:s3cret@gpu:8000/v1", source="flag")
    for line in ("/set remote.api_key", "/set serve.api_key", "/set remote.server", "/show", f"/save {tmp_path / 'chat.json'}"):
        assert app.handle_line(line) == OK, line
    shown = output(out) + (tmp_path / "chat.json").read_text()
    assert "remote.api_key = \"***\"  (from flag)" in shown and "remote.server = \"http://gpu:8000/v1\"  (from flag)" in shown
    assert not any(secret in shown for secret in ("sk-live", "s3cret", "alice"))


def test_set_alone_lists_what_it_can_change_with_values_and_sources(loaded, tmp_path):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("/set temperature 0.5")
    app.settings.sources["media.frames"] = "config /tmp/evil\x1b[2J.toml"  # a path: shown inert
    app.handle_line("/set system.message " + "x" * 60)
    output(out)
    assert app.handle_line("/set") == OK
    lines = output(out).split("\n")
    assert lines[0] == "settings /set can change:"
    listed = dict(re.fullmatch(r"  (\S+) += (.*)", line).groups() for line in lines[1:-2])
    assert list(listed) == runtime_keys()
    assert listed["generation.temperature"] == "0.5  (from /set)"
    assert listed["ui.stats"] == "true  (from default)"
    assert listed["generation.seed"] == "(not set)  (from default)"
    assert listed["generation.max_new_tokens"] == "8  (from flag)"
    assert listed["media.frames"] == "8  (from config /tmp/evil\\e[2J.toml)"
    assert listed["system.message"] == '"' + "x" * 38 + "…  (from /system)"  # /set KEY shows it whole
    assert "/set KEY shows it whole" in lines[-2]
    for key in runtime_keys():  # the same words as /set KEY
        app.handle_line(f"/set {key}")
        value, source = output(out).rstrip("\n").split(" = ", 1)[1].rsplit("  ", 1)
        assert listed[key].endswith("  " + source) and (listed[key].startswith(value) or key == "system.message")


@pytest.mark.parametrize("key", ["model.device", "ui.color", "ui.history", "ui.history_file"])
def test_set_refuses_what_cannot_change_while_running(loaded, tmp_path, key):
    app, out = make_app(loaded, tmp_path)
    before = app.settings.get(key)
    assert app.handle_line(f"/set {key} never") == ERROR
    assert f"error: {key} is read at start; " in out.getvalue() and app.settings.get(key) == before
    assert app.handle_line(f"/set {key}") == OK  # showing it is fine


@pytest.mark.parametrize(
    "line, message",
    [  # a key read at start is never suggested: it is said to be read at start, with its flag
        ("/set max_context 100", "model.max_context is read at start; restart with --max-context N"),
        ("/set max-context", "model.max_context is read at start; restart with --max-context N"),
        ("/set max_contxt 100", "unknown setting 'max_contxt'; model.max_context is read at start; "
                                "restart with --max-context N"),
        ("/set device cuda", "model.device is read at start; restart with --device DEV"),
        ("/set model.dtype bf16", "model.dtype is read at start; restart with --dtype T"),
        ("/set color never", "ui.color is read at start; set color in the config file's [ui] or "
                             "INTERNVL_CHAT_UI_COLOR, then restart"),
        ("/set history off", "ui.history is read at start; restart with --no-history"),
        # a switch sets one value only: --no-history never turns the history on
        ("/set history on", "ui.history is read at start; restart with --no-history to turn it off, or set history in "
                            "the config file's [ui] or INTERNVL_CHAT_UI_HISTORY, then restart"),
        ("/set serve.port 9", "serve.port is read by internvl-chat serve when it starts; this chat does not use it"),
        ("/set temprature 1", "unknown setting 'temprature' (did you mean 'temperature'?); "
                              "/set alone lists the settings it can change"),
        ("/set max_new_token 5", "unknown setting 'max_new_token' (did you mean 'max_new_tokens'?)"),
        ("/set xyzzy 1", "unknown setting 'xyzzy'; /set alone lists the settings it can change"),
        # a word that only shares letters with a setting read at start is not taken for it
        ("/set nope 1", "unknown setting 'nope'; /set alone lists the settings it can change"),
        ("/set foo 1", "unknown setting 'foo'; /set alone lists the settings it can change"),
        ("/set test 1", "unknown setting 'test'; /set alone lists the settings it can change"),
    ],
)
def test_set_suggests_only_keys_it_can_change(loaded, tmp_path, line, message):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(line) == ERROR
    assert output(out).startswith(f"error: {message}")


def test_tab_offers_only_keys_that_can_change_while_running():
    offered = [c.text for c in ChatCompleter().get_completions(Document("/set "), None)]
    assert "temperature" in offered and "generation.seed" in offered and "ui.stats" in offered
    assert not [k for k in offered if k.startswith("model.") or k in ("ui.color", "ui.history", "ui.history_file")]
    assert set(runtime_keys()) <= set(offered)
    assert [c.text for c in ChatCompleter().get_completions(Document("/set ui.c"), None)] == []


def test_bye_quits_like_exit(loaded, tmp_path):
    app, _ = make_app(loaded, tmp_path)
    assert app.handle_line("/bye") == EXIT and app.handle_line("/exit") == EXIT and app.handle_line("/quit") == EXIT


def test_banner_names_the_demo_model_and_what_it_answers(tmp_path):
    demo = load_model(EMBEDDED_MODEL, device="cpu", max_context=256)
    app, out = make_app(demo, tmp_path)
    app.banner()
    head, note = out.getvalue().split("\n")[:2]
    assert "the embedded demo model" in head and "context 256 tokens" in head
    assert "simple drawn shapes" in note and "--model DIR" in note


def test_banner_shows_4_bit_weights(tmp_path, tiny_original):
    from internvl_chat.quantize import quantize_checkpoint

    out_dir = quantize_checkpoint(tiny_original, tmp_path / "w4", "rtn", group_size=32, samples=2, device="cpu")
    app, out = make_app(load_model(out_dir, device="cpu", dtype="float32", max_context=256), tmp_path)
    app.banner()
    head = out.getvalue().split("\n")[0]
    assert "W4 AWQ g32 (rest float32)" in head and "w4" in head and "demo" not in out.getvalue()


# --- typed paths ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("typed")
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(d / "my pic.png")
    return d / "my pic.png"


def test_typed_paths_are_taken_out_of_the_message(picture):
    text, found, missing = take_media_paths(f"What is in '{picture}'?")
    assert (text, found, missing) == ("What is in?", [picture], [])
    text, found, _ = take_media_paths(f"{str(picture).replace(' ', chr(92) + ' ')} describe it\nplease")
    assert (text, found) == ("describe it\nplease", [picture])
    text, found, missing = take_media_paths("Compare /no/such/pic.png and this")
    assert (text, found, missing) == ("Compare /no/such/pic.png and this", [], [Path("/no/such/pic.png")])
    assert take_media_paths("no paths here, 3 % of it") == ("no paths here, 3 % of it", [], [])


def test_the_repl_sends_the_question_without_the_path(loaded, tmp_path, picture):
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line(f"Describe '{picture}' briefly.") == OK
    turn = app.session.turns[0]
    assert turn.user_text == "Describe briefly." and [m.path for m in turn.media] == [picture]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def test_one_shot_attaches_a_typed_path_like_the_repl(tiny_original, picture):
    import json

    run = _cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "2", "--json",
               "-p", f"Describe '{picture}' briefly.")  # fmt: skip
    assert run.returncode == 0, run.stderr
    usage = json.loads(run.stdout)["usage"]
    loaded = load_model(tiny_original, device="cpu", max_context=2048)
    from internvl_chat.chat.template import MediaSpec

    expected = Session(loaded).builder.first_turn("Describe briefly.", [MediaSpec("image", 1)])
    assert usage["prompt_tokens"] == len(expected)


def test_a_prompt_of_spaces_is_no_prompt(tiny_original):
    run = _cli("--model", str(tiny_original), "-p", "   \t ")
    assert run.returncode == 2 and "no prompt given" in run.stderr and "Traceback" not in run.stderr



def test_a_prompt_of_spaces_adds_nothing_to_piped_text(tiny_original):
    # the spaces were sent after the piped text, as "\n\n \t " (more prompt tokens, for nothing)
    import json

    def prompt_tokens(*prompt: str) -> int:
        run = _cli("--model", str(tiny_original), "--max-new-tokens", "1", "--json", *prompt, stdin="Some document.\n")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["usage"]["prompt_tokens"]

    assert prompt_tokens("-p", " \t ") == prompt_tokens("  ") == prompt_tokens()


# --- type-ahead ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"next question", "next question"),
        (b"next question\r", "next question"),
        (b"typo\x7f\x7fpo here\n", "typo here"),
        (b"one\rtwo\r", "one\ntwo"),
        (b"\x1b[A\x1b[Bleft\x1b[D", "left"),  # arrow keys are not text
        (b"junk\x15clean", "clean"),  # Ctrl-U
        (b"some words\x17", "some "),  # Ctrl-W
        (b"caf\xc3\xa9 \xe4\xb8\xad", "café 中"),
        (b"\x04\x07bell", "bell"),
        (b"\xff", "\ufffd"),
    ],
)
def test_typed_text(raw, text):
    assert typed_text(raw) == text


def test_held_keys_restores_the_terminal_on_every_path():
    import termios

    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "rb", buffering=0) as stream:
            before = termios.tcgetattr(slave)
            assert before[3] & termios.ECHO and before[3] & termios.ICANON
            with held_keys(stream) as typed:
                quiet = termios.tcgetattr(slave)
                assert not quiet[3] & termios.ECHO and not quiet[3] & termios.ICANON and quiet[3] & termios.ISIG
                os.write(master, b"typed ahead\r")
            assert typed.text == "typed ahead" and termios.tcgetattr(slave) == before
            with held_keys(stream):
                with keys_released():  # a question asked inside a command sees the usual terminal
                    assert termios.tcgetattr(slave) == before
                assert not termios.tcgetattr(slave)[3] & termios.ECHO
            assert termios.tcgetattr(slave) == before
            with pytest.raises(KeyboardInterrupt):
                with held_keys(stream):
                    raise KeyboardInterrupt
            assert termios.tcgetattr(slave) == before
        with held_keys(io.BytesIO()) as nothing:  # not a terminal: nothing to hold
            pass
        assert nothing.text == ""
    finally:
        os.close(master)
        os.close(slave)


class _SignalledHolds(list):
    """typeahead's stack of holds, where the REPL's SIGTERM handler raises SystemExit as a hold ends."""

    def pop(self, *args):
        super().pop(*args)
        raise SystemExit(143)


def _signalled_after_first(real):
    """_set_modes, where the REPL's SIGTERM handler raises SystemExit just after the first change."""
    calls = []

    def set_modes(fd, modes):
        real(fd, modes)
        calls.append(modes)
        if len(calls) == 1:
            raise SystemExit(143)

    return set_modes


@pytest.mark.parametrize("where", ["as the keys are held", "as the hold ends"])
def test_a_signal_at_either_edge_of_held_keys_leaves_the_terminal_as_it_was(monkeypatch, where):
    """A SIGTERM or SIGHUP whose handler raised (the REPL's SystemExit) just after the quiet modes
    were set, before the block's try, or as the hold was ended, before the modes were put back,
    ended the REPL with the terminal left without echo (seen once after a SIGTERM as /video began)."""
    import termios

    from internvl_chat.ui import typeahead

    if where == "as the keys are held":
        monkeypatch.setattr(typeahead, "_set_modes", _signalled_after_first(typeahead._set_modes))
    else:
        monkeypatch.setattr(typeahead, "_holds", _SignalledHolds())
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "rb", buffering=0) as stream:
            before = termios.tcgetattr(slave)
            with pytest.raises(SystemExit):
                with held_keys(stream):
                    pass
            assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_one_shot_json_on_a_terminal_escapes_what_would_drive_or_reorder_it(monkeypatch):
    # json.dumps(ensure_ascii=False) escapes ESC but wrote the answer's C1 controls (U+009B is a CSI),
    # DEL and bidi overrides raw to the terminal; a pipe keeps them raw (the same JSON either way)
    import argparse
    import json
    from types import SimpleNamespace

    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    answer = "left\u202eright \u009b31m red\x7f \u2067iso\u2069 \x1b[2J é 猫"

    class Answer:
        turns = [SimpleNamespace(answer_text=answer)]

        def ask(self, prompt, media, params=None, cancel=None):
            yield {"text": answer, "finish_reason": "stop", "timing": {}, "usage": {}, "token_ids": [1]}

        def describe(self):
            return SimpleNamespace(load_s=0.0)

    monkeypatch.setattr(oneshot, "open_conversation", lambda settings: Answer())
    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    args = argparse.Namespace(json=True, prompt_flag="hi", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False})
    for tty in (True, False):
        out = FakeStdout(tty)
        monkeypatch.setattr(sys, "stdout", out)
        assert oneshot.run_oneshot(args, settings, "hi") == 0
        line = out.getvalue()
        assert json.loads(line)["text"] == answer
        assert "é 猫" in line and "\x1b" not in line
        raw = [c for c in "\u202e\u009b\x7f\u2067\u2069" if c in line]
        assert raw == ([] if tty else list("\u202e\u009b\x7f\u2067\u2069"))


@pytest.mark.parametrize("chunks, shown", [(["a\r", "\nb"], "a\nb"), (["a\r", "b"], "a\nb"), (["a\r"], "a\n"),
                                           (["a\r\r\nb"], "a\n\nb")])  # fmt: skip
def test_one_shot_on_a_terminal_shows_a_carriage_return_as_a_line_break(monkeypatch, chunks, shown):
    # it was dropped ("a\rb" showed "ab"); a \r\n split over two deltas is still one line break.
    # A pipe gets the answer's text as generated.
    import argparse

    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    args = argparse.Namespace(json=False, prompt_flag="hi", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False, "ui.stats": False})
    for tty, expected in ((True, shown), (False, "".join(chunks))):
        monkeypatch.setattr(oneshot, "open_conversation", lambda settings: ChunkedAnswers(chunks))
        out = FakeStdout(tty)
        monkeypatch.setattr(sys, "stdout", out)
        assert oneshot.run_oneshot(args, settings, "hi") == 0
        assert out.getvalue() == expected + "\n"


def test_counts_are_said_with_their_noun_singular_for_one():
    # /save, /load and /export said "saved 1 turn(s)", /stats "prefill 1 tokens"
    assert [counted(n, "turn") for n in (0, 1, 2, 1024)] == ["0 turns", "1 turn", "2 turns", "1,024 turns"]


def test_the_spinner_spins_ascii_frames_where_the_output_cannot_hold_braille():
    """Under PYTHONIOENCODING=ascii (or LC_ALL=C without UTF-8 mode) each braille frame of the
    spinner came out as an escape, `\\u280b thinking \\u2026`; it spins `-\\|/` there. UTF-8: unchanged."""
    from rich.console import Console

    from internvl_chat.files import GLYPHS_OR_ESCAPES
    from internvl_chat.ui.spinner import spin

    for encoding, frames in (("ascii", "-\\|/"), ("utf-8", "\u280b\u2819\u2839\u2838\u283c\u2834\u2826\u2827\u2807\u280f")):
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding=encoding, errors=GLYPHS_OR_ESCAPES, write_through=True)
        console = Console(file=out, force_terminal=True, color_system=None, width=40)
        with spin(console, "thinking \u2026"):
            pass  # its stop draws a last frame
        shown = raw.getvalue().decode(encoding)
        assert re.search(f"[{re.escape(frames)}] thinking", shown), shown
        if encoding == "ascii":
            assert "thinking ..." in shown and "\\u" not in shown, shown


@pytest.mark.parametrize("locale", ["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_the_apps_glyphs_are_ascii_ones_under_an_ascii_output_encoding(tmp_path, locale):
    """`640×400 → 7 tiles · 1,795 tokens` came out as `640\\xd7400 \\u2192 7 tiles \\xb7 …` under an
    ASCII output encoding: plain ASCII glyphs now (`640x400 -> 7 tiles - …`); a UTF-8 one is unchanged."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "pic.png")
    (tmp_path / "chat.txt").write_text("/image pic.png\n/help\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "INTERNVL_CHAT_CONFIG": os.devnull}
    env.pop("PYTHONIOENCODING", None)
    utf8 = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--script", "chat.txt"], capture_output=True,
                          stdin=subprocess.DEVNULL, env={**env, "PYTHONIOENCODING": "utf-8"}, timeout=300, cwd=tmp_path)  # fmt: skip
    assert utf8.returncode == 0, utf8.stderr.decode(errors="replace")
    assert "64\u00d748 \u2192 " in utf8.stdout.decode() and "\u2026" in utf8.stdout.decode()
    key, value = locale.split("=")
    env.update({key: value, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--script", "chat.txt"], capture_output=True,
                         stdin=subprocess.DEVNULL, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    out = run.stdout.decode("ascii")
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert "64x48 -> " in out and "..." in out, out
    assert not re.search(r"\\(u[0-9a-f]{4}|x[0-9a-f]{2})", out + run.stderr.decode("ascii")), out


def test_an_answers_glyphs_on_an_ascii_terminal_keep_each_row_within_the_width():
    """rich padded a Markdown row to the width before the stream wrote "…" as `\\u2026` (or "...", or
    the image mark as `\\U0001f306`): the row ran past the width and the terminal wrapped it (a blank
    row, and the live tail's rows miscounted). The answer is measured as ASCII there, its structure
    as parsed from the answer ("· a" stays no list item); a UTF-8 terminal is unchanged."""
    from rich.console import Console

    from internvl_chat.files import GLYPHS_OR_ESCAPES
    from internvl_chat.ui.answer_markdown import AnswerMarkdown

    answer = "\u00b7 not a list\u2026 \u2192 x\n\n- one \u2014 two\n\n![alt](pic.png) and `a\u2026b`\n\n```\nx \u2192 y\n```\n"
    for encoding in ("ascii", "utf-8"):
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding=encoding, errors=GLYPHS_OR_ESCAPES, write_through=True)
        Console(file=out, force_terminal=True, color_system=None, width=40).print(AnswerMarkdown(answer))
        rows = raw.getvalue().decode(encoding).split("\n")
        assert all(cell_len(row) <= 40 for row in rows), rows
        if encoding == "ascii":
            assert rows[0].startswith("- not a list... -> x") and "[image] alt (pic.png) and a...b" in rows[4], rows
            assert " * one -- two" in rows[2], rows
        else:
            assert rows[0].startswith("\u00b7 not a list\u2026 \u2192 x") and " \u2022 one \u2014 two" in rows[2], rows


def test_an_answers_other_characters_on_an_ascii_terminal_keep_each_row_within_the_width_too():
    """Only the app's glyphs were measured as written: "é" and "你" (one and two cells as rich laid
    them out) are written as `\\xe9` and `\\u4f60` there, so a padded row still ran past the width,
    and the spinner's row ("loading café …") took a row more than rich erased at its stop."""
    from rich.console import Console

    from internvl_chat.files import GLYPHS_OR_ESCAPES
    from internvl_chat.ui.answer_markdown import AnswerMarkdown
    from internvl_chat.ui.spinner import spin

    def ascii_console():
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="ascii", errors=GLYPHS_OR_ESCAPES, write_through=True)
        return raw, Console(file=out, force_terminal=True, color_system=None, width=24)

    raw, console = ascii_console()
    console.print(AnswerMarkdown("aaaa bbbb cccc dd\u00e9\u00e9 eeee \u4f60\u597d ffff gggg\n\n- caf\u00e9 caf\u00e9 caf\u00e9 caf\u00e9\n"))
    rows = raw.getvalue().decode("ascii").split("\n")
    assert all(len(row) <= 24 for row in rows), rows
    assert "dd\\xe9\\xe9" in "".join(rows), rows
    raw, console = ascii_console()
    with spin(console, "loading caf\u00e9 caf\u00e9 \u2026"):
        pass
    shown = raw.getvalue().decode("ascii")
    drawing, _, stop = shown.partition("\x1b[?25h")
    # its frames: the first, and each one its refresh thread drew (a busy machine may hold the block
    # past a refresh), after erasing the one before (rich's position_cursor)
    frames = re.split(r"\r\x1b\[2K(?:\x1b\[1A\x1b\[2K)*", drawing.removeprefix("\x1b[?25l"))
    drawn = [frame.rstrip("\n").split("\n") for frame in frames]
    assert all(len(row) <= 24 for rows in drawn for row in rows), drawn
    assert stop.count("\x1b[1A") == len(drawn[-1]), shown  # every row it drew erased at its stop


def test_a_file_name_holding_a_glyph_is_escaped_not_shown_as_another_files_name_on_an_ascii_output(tmp_path):
    """The error handler wrote the app's glyphs as ASCII, and a file name's too: `a–b.png` (an en
    dash) read `a-b.png`, the name of another file there. A name's glyph is an escape (`a\\u2013b.png`),
    the app's own still ASCII ("64x48 -> 13 tiles")."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "a\u2013b.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "a-b.png")
    (tmp_path / "chat.txt").write_text("/image a\u2013b.png\n/media\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "INTERNVL_CHAT_CONFIG": os.devnull,
           "PYTHONIOENCODING": "ascii"}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--script", "chat.txt"], capture_output=True,
                         stdin=subprocess.DEVNULL, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    out = run.stdout.decode("ascii") + run.stderr.decode("ascii")
    assert run.returncode == 0, out
    assert "a-b.png" not in out and "+ image a\\u2013b.png 64x48 -> " in out, out
