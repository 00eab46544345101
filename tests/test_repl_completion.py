"""Tab completion of paths against hostile folders: what it inserts must read back as the same
file, and a huge folder or odd typed text must neither hang nor raise (no terminal needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import prompt_toolkit.layout.screen
import pytest
from prompt_toolkit.document import Document

from internvl_chat import files
from internvl_chat.ui import repl
from internvl_chat.ui.commands import parse_line
from internvl_chat.ui.paths import find_media_paths
from internvl_chat.ui.repl import ChatCompleter

ODD_NAMES = ["it's.png", 'q"x.png', "back\\slash.png", "--x.png", "-y.png", "nl\nx.png", "cr\rx.png",
             "esc\x1b[31m.png", "~root.png", "~no-such-user-internvl-chat.png", "dollar$HOME.png", "`tick`.png", "tab\tx.png",
             "file:x.png", "a b.png"]  # fmt: skip


def _completions(text: str, cwd: Path):
    return list(ChatCompleter(cwd).get_completions(Document(text), None))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@pytest.mark.parametrize("quote", ["", "'", '"'])
@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_completed_path_reads_back_as_the_same_file(tmp_path, name, quote):
    """The text Tab inserts, sent as `/image …` or as a message, names the file it listed:
    `'it's.png'` and `"q"x.png"` were cut at the quote, a name with a line break was split in
    two, and `--x.png` read as an option, `file:x.png` as a URI."""
    (tmp_path / name).write_bytes(b"")
    for typed in (quote + name[:1], quote + "./" + name[:1]):
        for before in ("/image ", "look at "):
            if before == "look at " and not typed.lstrip("'\"").startswith("./"):
                continue  # a message word is completed only when it looks like a path
            text = before + typed
            completions = _completions(text, tmp_path)
            assert completions, (text, name)
            read_back = []
            for completion in completions:
                line = text[: len(text) + completion.start_position] + completion.text
                if before == "/image ":
                    read_back += [tmp_path / p for p in parse_line(line).args]  # as App reads it (`~` expanded by parse_line)
                else:
                    read_back += [path for _, path in find_media_paths(line, tmp_path)]
            assert any(_same(p, tmp_path / name) for p in read_back), (text, [c.text for c in completions])


def test_a_name_that_is_not_utf8_is_offered_as_a_file_uri(tmp_path):
    """The app refuses any line holding bytes that are not UTF-8, so such a name, inserted as it is,
    could never be used (it was left out). It is offered as a `file:` URI, its bytes %-escaped: all
    ASCII, and read back as that file, in a command and in a message; a folder's URI completes further."""
    (tmp_path / os.fsdecode(b"bad\xff.png")).write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"")
    (tmp_path / os.fsdecode(b"dir\xff")).mkdir()
    (tmp_path / os.fsdecode(b"dir\xff/s\xfe.png")).write_bytes(b"")
    (tmp_path / os.fsdecode(b"dir\xff/s\xc3\xb6.png")).write_bytes(b"")
    (tmp_path / os.fsdecode(b"~x\xff.png")).write_bytes(b"")
    for text, offered in (("/image b", ["bad.png", "file:bad%FF.png"]), ("/image ./b", ["./bad.png", "file:./bad%FF.png"]),
                          ("/image ./d", ["file:./dir%FF/"]), ("look at ./", ["./bad.png", "file:./bad%FF.png", "file:./dir%FF/", "file:./~x%FF.png"]),
                          ("/image ~", ["file:./~x%FF.png"]), ("/image file:./dir%FF/", ["file:./dir%FF/s%C3%B6.png", "file:./dir%FF/s%FE.png"]),
                          ("look at file:./dir%FF/s%FE", ["file:./dir%FF/s%FE.png"])):  # fmt: skip
        completions = _completions(text, tmp_path)
        assert [c.text for c in completions] == offered, text
        for completion in completions:
            line = text[: len(text) + completion.start_position] + completion.text
            if not line.endswith(".png"):
                continue
            if text.startswith("/image"):
                read_back = [tmp_path / p for p in parse_line(line).args]
            else:
                read_back = [path for _, path in find_media_paths(line, tmp_path)]
            assert len(read_back) == 1 and read_back[0].is_file(), (line, read_back)
            assert files.visible(read_back[0].name) == completion.display_text, line


def test_a_saved_session_whose_name_is_not_utf8_is_not_offered(tmp_path):
    # /load's names were offered anyway: Tab inserted the byte, and Enter said "check the terminal's encoding"
    folder = tmp_path / "sessions"
    folder.mkdir()
    for name in (b"talk\xff.json", b"talk.json"):
        (folder / os.fsdecode(name)).write_text("{}")
    assert [c.text for c in repl.complete_session("ta", cwd=tmp_path, folder=folder)] == ["talk"]


# what reorders or hides text that prompt_toolkit draws raw in the input line (C0 and C1 controls it shows as ^X, <8x>)
FORMAT_CHARS = ["\u202e", "\u202a", "\u2067", "\u2069", "\u200e", "\u200f", "\u061c", "\u200b", "\u2028", "\u2029", "\ufeff"]


@pytest.mark.parametrize("char", FORMAT_CHARS)
def test_a_name_holding_a_bidi_or_invisible_mark_is_not_offered(tmp_path, char):
    """Tab inserted the mark raw into the input line, where `cat\u202egnp.png` showed as `catgnp.png`
    reversed (the menu showed it escaped); such a name is left out, as one that is not UTF-8 is."""
    (tmp_path / f"cat{char}x.png").write_bytes(b"")
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / f"dir{char}").mkdir()
    for text, offered in (("/image c", ["cat.png"]), ("/image ./", ["./cat.png"]), ("/load d", []), ("look at ./c", ["./cat.png"])):
        assert [c.text for c in _completions(text, tmp_path)] == offered, text
    folder = tmp_path / "sessions"
    folder.mkdir()
    for name in (f"talk{char}.json", "talk.json"):
        (folder / name).write_text("{}")
    assert [c.text for c in repl.complete_session("ta", cwd=tmp_path, folder=folder)] == ["talk"]


@pytest.mark.parametrize("char", FORMAT_CHARS)
def test_a_pasted_bidi_or_invisible_mark_is_drawn_escaped_in_the_input_line(char):
    """A pasted (or typed) name holding U+202E was drawn raw: the line showed reordered. It is
    drawn as <202e>, as prompt_toolkit draws a C1 control as <85>, and the line keeps the name."""
    import asyncio

    from prompt_toolkit import PromptSession
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output.vt100 import Vt100_Output

    drawn = io.StringIO()
    output = Vt100_Output(drawn, lambda: Size(rows=24, columns=80), term="xterm")
    with create_pipe_input() as pipe:
        pipe.send_text(f"/image cat{char}gnp.png\r")
        line = asyncio.run(asyncio.wait_for(PromptSession(input=pipe, output=output).prompt_async("> "), 60))
    assert line == f"/image cat{char}gnp.png"
    assert f"<{ord(char):04x}>" in drawn.getvalue() and char not in drawn.getvalue()


def test_joiners_are_text_drawn_and_completed_as_typed(tmp_path):
    """The zero-width joiner and non-joiner belong to words (Persian, Indic) and emoji sequences:
    an input line that showed a family emoji or `می‌خواهم` with <200d>/<200c> in it was broken."""
    family, word = "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert not any(files.has_format_char(text) for text in (family, word))
    assert prompt_toolkit.layout.screen.Char.display_mappings.get("\u200d") is None
    (tmp_path / f"{word}.png").write_bytes(b"")
    assert [c.text for c in _completions("/image \u0645", tmp_path)] == [f"{word}.png"]


def test_a_completed_path_keeps_the_folder_typed_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "~odd.png").write_bytes(b"")
    assert [c.text for c in _completions("/image ~/~o", tmp_path)] == ["~/~odd.png"]


def test_a_huge_folder_offers_a_bounded_menu_that_inserts_nothing_wrong(tmp_path, monkeypatch):
    """A folder of 200,000 files built 200,000 completions per Tab. The menu is cut at the limit;
    the last entry says how many more there are, and the common part Tab inserts is still right."""
    monkeypatch.setattr(repl, "COMPLETION_LIMIT", 5)
    for i in range(12):
        (tmp_path / f"f{i:02d}.png").write_bytes(b"")
    completions = _completions("/image ./f", tmp_path)
    assert [c.text for c in completions[:5]] == [f"./f{i:02d}.png" for i in range(5)]
    assert len(completions) == 6
    assert completions[-1].text == "./f" and completions[-1].start_position == -3  # changes nothing
    assert "7 more" in completions[-1].display_text
    from prompt_toolkit.completion.base import get_common_complete_suffix

    # the 5 shown share "./f0", but f10 and f11 exist: Tab must not insert the "0"
    assert get_common_complete_suffix(Document("/image ./f"), completions) == ""


@pytest.mark.parametrize("text", ["/image ./a\x00b/", "look ./a\x00b/c", "/save ./\x00/", "/image '" + "x/" * 3000])
def test_odd_typed_text_completes_to_nothing_without_raising(tmp_path, text):
    """A pasted NUL raised ValueError (embedded null byte) out of the completer: a traceback at Tab."""
    assert _completions(text, tmp_path) == []


def test_an_unreadable_or_vanished_folder_or_a_link_loop_completes_quietly(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "ok.png").write_bytes(b"")
    assert [c.text for c in _completions("/image ./", tmp_path)] == ["./ok.png"]
    assert _completions("/image ./loop/", tmp_path) == []
    assert _completions("/image ./gone/", tmp_path) == []
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        assert _completions("/image ./locked/", tmp_path) == []
    finally:
        locked.chmod(0o700)


def test_load_completes_its_skip_missing_flag(tmp_path):
    assert [c.text for c in _completions("/load --sk", tmp_path)] == ["--skip-missing"]
    assert [c.text for c in _completions("/load chat.json -", tmp_path)] == ["--skip-missing"]


def test_system_completes_its_default_flag(tmp_path):
    assert [c.text for c in _completions("/system --d", tmp_path)] == ["--default"]
    assert _completions("/system Be brief and --d", tmp_path) == []  # inside a TEXT, no flag is offered


_ASCII_LOCALE_COMPLETION = r'''
import os, sys
from pathlib import Path
from prompt_toolkit.document import Document
from internvl_chat.ui import repl
from internvl_chat.ui.commands import parse_line
from internvl_chat.ui.paths import find_media_paths
assert sys.getfilesystemencoding() == "ascii", sys.getfilesystemencoding()
cwd = Path(sys.argv[1])
def same(p):
    try:
        return os.path.samefile(cwd / p, cwd / os.fsdecode("n\xf6.png".encode()))
    except OSError:
        return False
offered = {}
for text in ("/image ", "/image n", "/image n\xf6", "/image 'n", "look at ./n", "/image d\xe9j\xe0/n"):
    completions = list(repl.ChatCompleter(cwd).get_completions(Document(text), None))
    offered[text] = [c.text for c in completions]
    for c in completions:
        line = text[: len(text) + c.start_position] + c.text
        if not line.endswith(".png"):
            continue
        if text.startswith("/image"):
            paths = parse_line(line).args
            inside = text.startswith("/image d")
            assert all(os.path.samefile(cwd / p, cwd / os.fsdecode("d\xe9j\xe0/n\xf6.png".encode())) if inside else same(p)
                       for p in paths if "abc" not in str(p) and "\udcff" not in str(p)), (line, paths)
            assert all(os.path.isfile(cwd / p) for p in paths), (line, paths)
        else:
            assert [same(p) or p.name == "n\udcff.png" and p.is_file() for _, p in find_media_paths(line, cwd)] == [True], line
sessions = cwd / "sessions"
offered["/load t"] = [c.text for c in repl.complete_session("t", cwd=cwd, folder=sessions)]
print(ascii(offered))
'''


def test_a_non_ascii_name_is_offered_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C without UTF-8 mode the file system lists "nö.png" with each byte of "ö" a
    surrogate, which the completer took for a name that is not UTF-8 and left out; a typed folder
    "déjà/" listed nothing (os refuses "é" under ASCII). Typed text is read as UTF-8 there, so the
    name is offered as "nö.png", which the app reads back to the same file."""
    import ast
    import subprocess
    import sys

    for name in ("n\xf6.png", "abc.png", "d\xe9j\xe0/n\xf6.png", "sessions/t\xe9.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / os.fsdecode(b"n\xff.png")).write_bytes(b"")  # not UTF-8: a file: URI
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "ascii",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _ASCII_LOCALE_COMPLETION, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    offered = ast.literal_eval(run.stdout)
    assert offered == {
        "/image ": ["abc.png", "d\xe9j\xe0/", "n\xf6.png", "file:n%FF.png", "sessions/"],
        "/image n": ["n\xf6.png", "file:n%FF.png"],
        "/image n\xf6": ["n\xf6.png"],
        "/image 'n": ["'n\xf6.png'", "file:n%FF.png"],
        "look at ./n": ["./n\xf6.png", "file:./n%FF.png"],
        "/image d\xe9j\xe0/n": ["d\xe9j\xe0/n\xf6.png"],
        "/load t": ["t\xe9"],
    }


def test_the_more_entry_of_a_cut_menu_is_ascii_where_the_terminal_is(tmp_path, monkeypatch):
    # prompt_toolkit writes what the output's encoding cannot hold as "?": the entry read "? 7 more"
    monkeypatch.setattr(repl, "COMPLETION_LIMIT", 5)
    for i in range(12):
        (tmp_path / f"f{i:02d}.png").write_bytes(b"")
    for encoding, shown in (("ascii", "... 7 more"), ("utf-8", "\u2026 7 more")):
        monkeypatch.setattr("sys.stdout", io.TextIOWrapper(io.BytesIO(), encoding=encoding))
        assert _completions("/image ./f", tmp_path)[-1].display_text.startswith(shown)
