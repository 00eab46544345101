from __future__ import annotations

import io
import re
import signal

import pyte
import pytest
from rich.console import Console
from rich.markdown import Markdown
from screen_model import make_screen

from internvl_chat.ui import markdown_blocks, render
from internvl_chat.ui.answer_markdown import AnswerMarkdown
from internvl_chat.ui.markdown_blocks import BlockSplitter
from internvl_chat.ui.render import MarkdownStream, PlainStream, choose_stream, make_console
from internvl_chat.ui.summary_lines import format_attach_line, format_stats

# --- the block committer -----------------------------------------------------------------------


def split_committable(text: str) -> tuple[list[str], str]:
    """`text` as finished blocks and the unfinished tail (see `BlockSplitter`);
    `"".join(blocks) + tail == text`."""
    splitter = BlockSplitter()
    blocks = splitter.feed(text)
    return blocks, splitter.tail


@pytest.mark.parametrize(
    "text, blocks, tail",
    [
        ("", [], ""),
        ("Hello wor", [], "Hello wor"),
        ("One line.\n", [], "One line.\n"),  # the paragraph may go on
        ("Para one\nline two.\n\nPara t", ["Para one\nline two.\n\n"], "Para t"),
        ("A.\n\nB.\n\nC", ["A.\n\n", "B.\n\n"], "C"),
        ("A.\n\n\n\nB", ["A.\n\n"], "\n\nB"),
        # headings are finished at the end of their line
        ("# Title\nText", ["# Title\n"], "Text"),
        ("# Tit", [], "# Tit"),
        ("Intro\n## Part\nmore", ["Intro\n", "## Part\n"], "more"),
        # fenced code: blank lines inside never split it; finished at the closing fence
        ("```py\na = 1\n\nb = 2\n", [], "```py\na = 1\n\nb = 2\n"),
        ("```py\na = 1\n\nb = 2\n```", [], "```py\na = 1\n\nb = 2\n```"),
        ("```py\na = 1\n\nb = 2\n```\nafter", ["```py\na = 1\n\nb = 2\n```\n"], "after"),
        ("~~~~\n```\n\n~~~~\nx", ["~~~~\n```\n\n~~~~\n"], "x"),  # ``` does not close ~~~~
        ("````\n```\n\n```\n", [], "````\n```\n\n```\n"),  # a shorter fence does not close
        ("Intro:\n```\ncode\n", ["Intro:\n"], "```\ncode\n"),
        # lists: kept while they may still grow
        ("- a\n- b\n", [], "- a\n- b\n"),
        ("- a\n- b\n\n", [], "- a\n- b\n\n"),
        ("- a\n- b\n\n- c\n\nEnd\n", ["- a\n- b\n\n- c\n\n"], "End\n"),
        ("- a\n\n  more of a\n\nEnd", ["- a\n\n  more of a\n\n"], "End"),
        ("1. a\n2. b\n\n3", [], "1. a\n2. b\n\n3"),  # "3" may become "3. c"
        ("1. a\n2. b\n\n3 apples", ["1. a\n2. b\n\n"], "3 apples"),
        ("- a\n\n-", [], "- a\n\n-"),
        ("- a\n\n-x", ["- a\n\n"], "-x"),
        ("- a\n\nE", ["- a\n\n"], "E"),
        ("- a\n\n  ```\n  x\n\n  ```\n\nEnd", ["- a\n\n  ```\n  x\n\n  ```\n\n"], "End"),
        ("- a\n# Head\n", ["- a\n", "# Head\n"], ""),
        ("- a\nlazy line\n\nEnd", ["- a\nlazy line\n\n"], "End"),
        # CJK text
        ("中文段落，第一段。\n\n第二段還在寫", ["中文段落，第一段。\n\n"], "第二段還在寫"),
        ("日本語の文。\n\u3000\n続き", [], "日本語の文。\n\u3000\n続き"),  # an ideographic space is text
    ],
)
def test_split_committable(text, blocks, tail):
    assert split_committable(text) == (blocks, tail)


DOCS = [
    "# Heading\n\nFirst paragraph with **bold** and `code`.\nSecond line of it.\n\n"
    "```python\nx = 1\n\ny = 2\n```\n\n1. one\n2. two\n\n   still two\n3. three\n\n"
    "> quoted\n\n## Sub\nText after heading.\n\n中文段落，测试对齐。\n\n---\n\nLast words.\n",
    "- a\n- b\n\npara\n\n> q\n> r\n\n***\n# T\n| a | b |\n|---|---|\n| 1 | 2 |\n\nend",
    "Intro:\n```\ncode\n```\nafter\n* x\n\n  * nested\n\n  ```\n  in list\n\n  ```\nlazy\n\nout",
    "色々な文字：漢字、かな、한글。\n\n第二段落は **太字** を含む。\n\n- 項目一\n- 項目二\n\n終わり。",
    # an indented code block with blank lines inside is one block (it was cut at each blank line,
    # drawn as several code blocks); a line indented less ends it, whatever it starts
    "Code:\n\n    def f():\n        return 1\n\n\n    ```\n    def g():\n\treturn 2\n\nEnd.\n\n    x\n\n    y\n# H\n",
    # an indented code block right after a thematic break, a setext heading or a table (no paragraph
    # open there) was cut at its blank line into two code blocks
    "***\n    code\n\n    more\nEnd.\n",
    "Title\n=====\n    code\n\n    more\nEnd.\n",
    "| a | b |\n|---|---|\n| 1 | 2 |\n    x\n\n    y\nEnd.\n",
    # a fence indented 4 is a paragraph's text (the paragraph was cut before it), and one indented 4
    # does not close a fence (the code block was cut there)
    "text\n    ```\n    x\n\n    y\n",
    "```\ncode\n    ```\nmore\n```\nafter\n",
    # a numbered line from 2 (or an empty item) under a paragraph's line is its text, not a list:
    # the `---` under it was a rule cut off from the paragraph, not its setext heading underline
    "It was founded in\n1998. Since then it grew.\n---\nMore.\n",
    "| a | b |\n---\n2. step\n\n   more of it\n",  # but under a setext heading's `---` (1 cell: no table) it is a list
    # a line of a list item's fenced code indented less than the item's text ends the item and the
    # code block there (CommonMark): a fence at the margin opens a code block that runs on past the
    # blank line, and code at the margin is a paragraph after the list, its closing fence opening a
    # new code block (the fence was closed there and the rest cut at the blank line)
    "1. Run:\n   ```bash\n   pip install x\n```\n2. Next\n\nDone.\n",
    "1. Run:\n   ```bash\npip install x\n   ```\n2. Next\n\nDone.\n",
    "- Setup:\n    1. Build:\n       ```bash\n       make\n```\n\nDone.\n",  # an item nested 4 deep
    # text at the margin right under a list item's code block ends the list too (no paragraph is open
    # to take it as lazy text): a `---` under it is its setext heading's underline (it was a rule)
    "1. Build:\n   ```bash\n   make\n   ```\nThat's it.\n---\nMore.\n",
    # HTML is text to the stream (html off): a <details> block is paragraphs, <br> stays inline
    "<details>\n<summary>More</summary>\n\nHidden text.\n\n</details>\n\n- one<br>two\n- three\n<br>\nafter\n",
]


@pytest.mark.parametrize("doc", DOCS)
def test_streaming_commits_the_same_blocks_as_the_whole_text(doc):
    """Splitting the tail again after every delta gives the blocks the finished text gives."""
    full_blocks, full_tail = split_committable(doc)
    assert "".join(full_blocks) + full_tail == doc
    committed: list[str] = []
    pending = ""
    for ch in doc:
        blocks, pending = split_committable(pending + ch)
        committed += blocks
        assert "".join(committed) + pending == doc[: len("".join(committed) + pending)]
    assert committed == full_blocks
    assert pending == full_tail


# --- streams ------------------------------------------------------------------------------------


def recording_console() -> Console:
    return Console(record=True, width=80, force_terminal=False, file=io.StringIO())


def render_whole(doc: str) -> str:
    """The whole answer as the stream's Markdown renders it (rich's own drops raw HTML: not what the
    stream shows, however it splits)."""
    console = recording_console()
    console.print(AnswerMarkdown(doc.strip("\n")))
    return console.export_text()


def stream_in_pieces(doc: str, step: int) -> tuple[str, str]:
    console = recording_console()
    stream = MarkdownStream(console)
    for i in range(0, len(doc), step):
        stream.feed(doc[i : i + step])
    text = stream.finish()
    return console.export_text(), text


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("step", [1, 3, 7, 10_000])
def test_markdown_stream_renders_like_the_whole_document(doc, step):
    output, text = stream_in_pieces(doc, step)
    assert text == doc
    assert output == render_whole(doc)


def test_markdown_stream_shows_every_paragraph_exactly_once():
    paragraphs = [f"Paragraph number {i} says something unique {i * 7}." for i in range(12)]
    paragraphs.append("最後の段落は日本語で書かれています。")
    doc = "\n\n".join(paragraphs)
    output, _ = stream_in_pieces(doc, 2)
    for paragraph in paragraphs:
        assert output.count(paragraph) == 1


def test_markdown_stream_finish_twice_prints_nothing_more():
    console = recording_console()
    stream = MarkdownStream(console)
    stream.feed("Just one line")
    stream.finish()
    first = console.export_text(clear=False)
    stream.finish()
    assert console.export_text() == first
    assert first.count("Just one line") == 1


def emulate_terminal(raw: str, width: int = 60, height: int = 40) -> str:
    """The screen a terminal (pyte's VT100 model) shows after `raw`."""
    screen = pyte.Screen(width, height)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))  # a tty's output processing adds the \r
    return "\n".join(line.rstrip() for line in screen.display).strip("\n")


def test_markdown_stream_on_a_terminal_leaves_the_same_screen_as_the_whole_document():
    """With a (forced) terminal the tail is live and redrawn in place; once finished, the
    screen shows the document exactly as rendered in one go, each block once."""
    doc = "# Title\n\nFirst para.\n\n- a\n- b\n\n```\ncode\n\nmore\n```\n\nSecond para, still growing"
    out = io.StringIO()
    console = Console(file=out, width=60, height=40, force_terminal=True, color_system=None)
    with MarkdownStream(console, refresh_interval_s=0) as stream:
        for ch in doc:
            stream.feed(ch)
    assert "\x1b[J" in out.getvalue()  # the live region was redrawn in place
    expected = Console(file=io.StringIO(), width=60, record=True, force_terminal=False)
    expected.print(Markdown(doc))
    want = "\n".join(line.rstrip() for line in expected.export_text().splitlines()).strip("\n")
    assert emulate_terminal(out.getvalue()) == want


def _screen_once(out: io.StringIO, wanted: str, within_s: float = 60.0) -> bool:
    """Whether `wanted` reaches the emulated screen within `within_s` (a liveness bound, no timing)."""
    import time

    deadline = time.monotonic() + within_s
    while wanted not in " ".join(emulate_terminal(out.getvalue()).split()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_delta_throttled_just_before_a_pause_is_still_drawn(monkeypatch):
    """A delta fed within refresh_interval_s of the last redraw is left to the next feed; when
    none came (a server pausing mid-answer, a slow next token) it was never drawn, and the app
    waited in its next read with stale text on the screen. A timer now draws it at the
    interval's end. The clock is held still, so every feed after the first is throttled."""
    from types import SimpleNamespace

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.05)
    stream.feed("First words")
    stream.feed(" and the last ones")  # throttled: no feed comes after it
    assert _screen_once(out, "First words and the last ones"), emulate_terminal(out.getvalue())
    stream.finish()
    assert emulate_terminal(out.getvalue()) == "First words and the last ones"


def test_a_throttled_tail_is_not_drawn_after_the_answer_finished(monkeypatch):
    """finish() prints the rest and ends the live region; a deferred redraw still pending then
    draws nothing more (its frame would be left below the answer, under the next prompt)."""
    from types import SimpleNamespace

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.2)
    timers = _started_threads(monkeypatch)
    stream.feed("Para one.\n\nPara")
    stream.feed(" two")  # throttled: a late draw is set
    stream.finish()
    end = out.getvalue()
    for timer in timers:
        timer.join(30)  # whatever was pending has had its turn
    assert out.getvalue() == end
    assert emulate_terminal(end) == "Para one.\n\nPara two"


def _started_threads(monkeypatch) -> list:
    import threading

    started = []
    start = threading.Thread.start

    def counting(self):
        started.append(self)
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    return started


def test_throttled_tails_are_drawn_by_one_thread_an_answer(monkeypatch):
    """Each frame drawn late (during fast streaming nearly every one) started a threading.Timer
    of its own: ~15 threads a second, each start() waiting in the app's thread for it to run.
    One drawer thread now draws them all. The clock is held still, so every feed is throttled."""
    from types import SimpleNamespace

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    monkeypatch.setattr(render, "IDLE_S", 600.0, raising=False)  # never idle between the test's frames, however slow the machine
    started = _started_threads(monkeypatch)
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.01)
    stream.feed("w0")
    for i in range(1, 6):
        stream.feed(f" w{i}")  # throttled: drawn late
        assert _screen_once(out, " ".join(f"w{j}" for j in range(i + 1))), emulate_terminal(out.getvalue())
    stream.finish()
    for thread in started:
        thread.join(30)
    assert len(started) == 1
    assert emulate_terminal(out.getvalue()) == "w0 w1 w2 w3 w4 w5"


def test_a_failure_drawing_a_throttled_tail_prints_no_traceback(monkeypatch):
    """A frame drawn late that failed (other than OSError/ValueError) went to threading's
    excepthook: a traceback printed into the answer. The app's own next draw meets the failure."""
    import threading
    from types import SimpleNamespace

    from internvl_chat.ui import live_tail

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    started = _started_threads(monkeypatch)
    hooked, tried = [], threading.Event()
    monkeypatch.setattr(threading, "excepthook", hooked.append)
    draw = live_tail.LiveTail.draw

    def failing(self, renderable):
        if threading.current_thread() is threading.main_thread():
            return draw(self, renderable)
        tried.set()
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(live_tail.LiveTail, "draw", failing)
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.01)
    stream.feed("First")
    stream.feed(" words")  # throttled: drawn late, which fails
    assert tried.wait(60)
    stream.finish()
    for thread in started:
        thread.join(30)
    assert hooked == []
    assert emulate_terminal(out.getvalue()) == "First words"


def test_finish_on_a_terminal_gone_stops_the_drawer_and_closes_the_region(monkeypatch):
    """finish() printing the last block into a terminal that went away raised before the live
    region was closed: its Ctrl-Z hook (the SIGTSTP handler) stayed installed. It is closed now,
    and the error raised is the print's, not the close's."""
    from types import SimpleNamespace

    from internvl_chat.ui import suspend

    class Gone(io.StringIO):
        gone = False

        def write(self, text):
            if self.gone:
                raise OSError(5, "Input/output error") if text.strip() else OSError(9, "Bad file descriptor")
            return super().write(text)

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    monkeypatch.setattr(render, "IDLE_S", 600.0)
    started = _started_threads(monkeypatch)
    out = Gone()
    console = Console(file=out, width=60, height=20, force_terminal=True, force_interactive=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.01)
    stream.feed("First")
    stream.feed(" words")  # throttled: the drawer thread starts
    out.gone = True
    with pytest.raises(OSError) as raised:
        stream.finish()
    assert raised.value.errno == 5
    assert stream._live is None and suspend._open == []
    for thread in started:
        thread.join(30)
        assert not thread.is_alive()


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks")
def test_the_thread_drawing_a_throttled_tail_leaves_signals_to_the_main_thread(monkeypatch):
    """The thread that draws a throttled tail late (a threading.Timer) did not block the process's
    signals: a Ctrl-C or Ctrl-Z the kernel gave it, while the app waited in a read for a pausing
    server, was handled only once the server's next piece came (threads.py's workers block them)."""
    import threading
    from types import SimpleNamespace

    from internvl_chat.threads import PROCESS_SIGNALS
    from internvl_chat.ui import live_tail

    monkeypatch.setattr(render, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    started = _started_threads(monkeypatch)
    masks, drawn = [], threading.Event()
    draw = live_tail.LiveTail.draw

    def recording(self, renderable):
        if threading.current_thread() is not threading.main_thread():
            masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
            drawn.set()
        return draw(self, renderable)

    monkeypatch.setattr(live_tail.LiveTail, "draw", recording)
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0.01)
    stream.feed("First")
    stream.feed(" words")  # throttled: drawn late
    assert drawn.wait(60)
    stream.finish()
    for thread in started:
        thread.join(30)
    assert masks and PROCESS_SIGNALS <= set(masks[0])


def test_a_long_unfinished_block_costs_each_token_the_same(monkeypatch):
    """A list (or code block) that goes on for the whole answer stays unfinished: each of its
    lines is looked at once, not the whole tail again on every token (time quadratic in a
    30,000-token answer)."""
    looked_at = []
    indent = markdown_blocks._indent
    monkeypatch.setattr(markdown_blocks, "_indent", lambda line: looked_at.append(line) or indent(line))
    lines = [f"- item {i}\n" for i in range(400)]
    stream = MarkdownStream(recording_console())
    for line in lines:
        stream.feed(line[:3])
        stream.feed(line[3:])
    stream.finish()
    assert len(looked_at) <= len(lines) + 1


def test_the_live_tail_renders_only_the_end_of_a_long_unfinished_block(monkeypatch):
    """Each frame renders at most LIVE_TAIL_CHARS of the tail (a code block keeps its opening
    fence, so it still looks like code); the finished screen is the whole document."""
    import markdown_it

    parsed: list[str] = []
    parse = markdown_it.MarkdownIt.parse
    monkeypatch.setattr(markdown_it.MarkdownIt, "parse", lambda self, src, env=None: parsed.append(src) or parse(self, src, env))
    monkeypatch.setattr(render, "LIVE_TAIL_CHARS", 200, raising=False)
    code = "".join(f"x{i} = {i}\n" for i in range(60))
    doc = "".join(f"- item {i}\n" for i in range(60)) + "\nText.\n\n```python\n" + code + "```\n\nEnd."
    out = io.StringIO()
    console = Console(file=out, width=60, height=30, force_terminal=True, color_system=None)
    with MarkdownStream(console, refresh_interval_s=0) as stream:
        for line in doc.splitlines(keepends=True):
            stream.feed(line)
    frames = [src for src in parsed if src.strip() not in {block.strip() for block in split_committable(doc)[0]}]
    frames = [src for src in frames if src.strip() != "End."]  # the last paragraph, printed whole at the end
    assert frames and max(len(src) for src in frames) <= 200 + len("```python\n")
    assert any(src.startswith("```python\n") and "x59 = 59" in src and "x0 = 0" not in src for src in frames)
    expected = Console(file=io.StringIO(), width=60, record=True, force_terminal=False)
    expected.print(Markdown(doc))
    want = "\n".join(line.rstrip() for line in expected.export_text().splitlines()).strip("\n")
    assert emulate_terminal(out.getvalue(), width=60, height=300) == want


@pytest.mark.parametrize("piece", ["w{i} ", "w{i}\n"], ids=["one long line", "many lines"])
def test_the_live_preview_of_a_long_tail_moves_seldom(piece):
    """The end of a long tail that a frame renders starts at the same place for many tokens (at
    a word or line start): starting it afresh on each frame wrapped the rows shown differently
    every time."""
    splitter = BlockSplitter()
    starts = set()
    for i in range(2000):
        splitter.feed(piece.format(i=i))
        if splitter.chars > 200:
            preview = splitter.preview(200, 10_000)
            assert splitter.tail.endswith(preview) and len(preview) <= 200 and preview.startswith("w")
            starts.add(splitter.chars - len(preview))
    assert len(starts) <= splitter.chars // 100 + 1


def test_the_live_preview_of_many_short_lines_holds_two_screens_of_them():
    """10,000 short lines are one paragraph: a frame renders the last two screens of its lines
    (rendering rows that cannot be shown cost most of a frame), cut at a line that moves seldom."""
    splitter = BlockSplitter()
    starts = set()
    for i in range(3000):
        splitter.feed(f"l{i}\n")
        if splitter.lines > 40:
            preview = splitter.preview(100_000, 40)
            assert splitter.tail.endswith(preview) and 20 <= preview.count("\n") <= 40
            starts.add(splitter.chars - len(preview))
    assert len(starts) <= 3000 // 20 + 1


class ResizedTerminal:
    """A console's file that drives a screen model, and can resize the window just before a
    write: a resize that lands between a frame's layout and its write (or while it is in flight)."""

    def __init__(self, columns: int, lines: int, reflow: bool) -> None:
        self.screen = make_screen(columns, lines, reflow)
        self.stream = pyte.Stream(self.screen)
        self.console = Console(file=self, width=columns, height=lines, force_terminal=True, color_system=None)
        self.resize_before_next_write: tuple[int, int] | None = None

    def write(self, data: str) -> int:
        if self.resize_before_next_write is not None:
            columns, lines = self.resize_before_next_write
            self.resize_before_next_write = None
            self.screen.resize(lines, columns)
            self.console.size = (columns, lines)
        self.stream.feed(data.replace("\n", "\r\n"))  # a tty's output processing adds the \r
        return len(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display).strip("\n")


@pytest.mark.parametrize("reflow", [True, False], ids=["reflowing", "xterm-like"])
@pytest.mark.parametrize("new_columns", [50, 110])
@pytest.mark.parametrize("at", [100, 159], ids=["mid-answer", "last frame"])
def test_a_resize_between_a_frames_layout_and_its_write_leaves_no_stale_line(reflow, new_columns, at):
    """The live tail laid out for 80 columns lands on a window that has just changed width: the
    next frame (or the end of the answer) still starts where the region does, so no row of an
    earlier frame is left behind."""
    words = [f"word{i}" for i in range(160)]
    doc = " ".join(words)  # one paragraph: all of it stays in the live tail until the end
    terminal = ResizedTerminal(80, 40, reflow)
    with MarkdownStream(terminal.console, refresh_interval_s=0) as stream:
        for i, word in enumerate(words):
            if i == at:  # the tail is 8 rows tall at 80 columns, 10 at the end
                terminal.resize_before_next_write = (new_columns, 40)
            stream.feed(word if i == 0 else " " + word)
    expected = Console(file=io.StringIO(), width=new_columns, record=True, force_terminal=False)
    expected.print(Markdown(doc))
    want = "\n".join(line.rstrip() for line in expected.export_text().splitlines()).strip("\n")
    assert terminal.text() == want


def test_a_link_in_an_answer_shows_its_target_and_is_no_hidden_hyperlink():
    """A model's `[the docs](https://evil.example/x)` must not become a clickable terminal link
    (OSC 8) whose target is hidden behind harmless words: the target is printed beside them."""
    out = io.StringIO()
    console = Console(file=out, width=60, height=40, force_terminal=True, color_system="truecolor")
    with MarkdownStream(console, refresh_interval_s=0) as stream:
        stream.feed("Read [the docs](https://evil.example/x) now.\n\n| a |\n|---|\n| [b](https://e.example/) |\n")
    assert "\x1b]8;" not in out.getvalue()
    screen = emulate_terminal(out.getvalue())
    assert "https://evil.example/x" in screen and "https://e.example/" in screen


def shown(doc: str, width: int = 80) -> str:
    """The answer as the stream prints it, without trailing spaces."""
    console = Console(record=True, width=width, force_terminal=False, file=io.StringIO())
    with MarkdownStream(console) as stream:
        stream.feed(doc)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def test_html_in_an_answer_is_shown_as_text():
    """rich drops raw HTML: `if x<y and y>z` lost `<y and y>`, a `<div>` block vanished."""
    screen = shown("Since x<y and y>z, use <b>bold</b> or <kbd>Ctrl</kbd>.\n\n<div>\nin a div\n</div>\n")
    assert "Since x<y and y>z, use <b>bold</b> or <kbd>Ctrl</kbd>." in screen
    assert "<div>" in screen and "in a div" in screen and "</div>" in screen


def test_an_image_shows_its_target_where_it_stands():
    """rich drew an image as its alt text before the paragraph it stood in, its target hidden."""
    screen = shown("See ![a cat](https://img.example/cat.png) here.\n")
    assert "See 🌆 a cat (https://img.example/cat.png) here." in screen


def test_a_reference_definition_is_shown_as_text():
    """The answer is printed block by block: the definition rendered as nothing and the `[docs]`
    of a later block named no link, so the target was lost."""
    screen = shown("[docs]: https://ref.example/x\n\nRead [docs] now.\n")
    assert "[docs]: https://ref.example/x" in screen and "Read [docs] now." in screen


@pytest.mark.parametrize(
    "doc, width",
    [
        (">" * 30 + " deepest words\n", 80),  # past markdown-it's nesting limit: it dropped them
        ("- " * 12 + "deepest words\n", 80),
        ("> " * 12 + "deepest words\n", 30),  # the quote bars took the whole width
        ("- a\n  - b\n    - deepest words\n", 6),
        ("```\ndeepest words\n```\n", 2),  # the code block's padding took it
    ],
)
def test_nesting_deeper_than_the_width_allows_shows_the_text(doc, width):
    screen = "".join(shown(doc, width).split())
    assert "deepestwords" in screen


def test_a_nested_block_shown_as_plain_text_keeps_its_blank_line():
    assert shown("Before.\n\n" + ">" * 30 + " deep\n\nAfter.\n").startswith("Before.\n\n>>>")


def test_a_long_list_with_a_short_numbered_list_inside_is_still_drawn_as_a_list():
    """Only nesting that leaves too little width falls back to plain text: a numbered list's
    marker is as wide as its own last number, however long the block around it."""
    doc = "".join(f"- x{i}\n" for i in range(500)) + "- last\n  1. a\n  2. b\n"
    screen = shown(doc, 16)
    assert " • x0" in screen and "1 a" in screen and "- x0" not in screen


def test_a_table_wider_than_the_terminal_loses_no_cell():
    """rich cut a cell that did not fit with … and gave columns past the width no room at all."""
    doc = "| a | b | c | d | e | f |\n|---|---|---|---|---|---|\n| 1 | 2 | 3 | 4 | 5 | abcdefghijklmnop |\n"
    screen = shown(doc, 20)
    assert "…" not in screen
    assert set("abcdef12345") <= set(screen)
    assert "abcdefghijklmnop" in "".join(line.split()[-1] for line in screen.splitlines() if line.strip())  # folded in its column
    header = "|" + "".join(f" c{i} |" for i in range(300))
    row = "|" + "".join(f" v{i} |" for i in range(300))
    wide = f"{header}\n|{'---|' * 300}\n{row}\n"
    words = re.findall(r"[cv]\d+", shown(wide, 80))
    assert sorted(words) == sorted([f"c{i}" for i in range(300)] + [f"v{i}" for i in range(300)])
    # as narrow as 3 cells a column, rich gave a column no room at all
    cells = ["hdhe", "jhjeeci", "hedddabe", "fjjhgcb", "bjejeejhbbdcej", "cjaidd", "qq", "zz"]
    doc = f"| {' | '.join(cells[:4])} |\n|---|---|---|---|\n| {' | '.join(cells[4:])} |\n"
    assert sorted(re.sub(r"[^a-z]", "", shown(doc, 12))) == sorted("".join(cells))


@pytest.mark.parametrize("doc", ["a &#x202e;txt.exe", "a &#8238;txt.exe", "**&#x202E;b**", "![&#x2066;alt](u)",
                                 "| &#x202d; |\n|---|\n| x |"])  # fmt: skip
def test_a_bidi_override_written_as_an_entity_is_escaped_as_one_written_as_itself(doc):
    """The answer's bidi overrides are escaped before it is rendered (answer_text.py), but
    markdown-it decoded `&#x202e;` into a raw override that reordered the line on the terminal."""
    screen = shown(doc)
    assert not set(screen) & {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
    assert re.search(r"\\u20(2e|2d|66)", screen)


def test_a_links_title_is_shown_with_its_target():
    """rich showed `[a](u "title")` as `a (u)`: the title's words never reached the screen."""
    screen = shown('See [docs](https://d.example "run rm -rf ~") and ![cat](c.png "a &#x202e;cat").\n')
    assert 'docs (https://d.example "run rm -rf ~")' in screen
    assert '🌆 cat (c.png "a \\u202ecat")' in screen


def test_a_table_row_longer_than_its_header_loses_no_cell():
    """markdown-it drops the cells of a row past its header's: `SECRET` never reached the screen."""
    doc = "| a | b |\n|---|---|\n| 1 | 2 | SECRET | MORE |\n| x |\n\nAfter.\n"
    screen = shown(doc)
    assert "SECRET" in screen and "MORE" in screen and "After." in screen
    assert "─" in shown("| a | b |\n|---|---|\n| 1 \\| x | 2 |\n| 3 | 4 | |\n")  # an escaped pipe, an empty cell: a table


def test_a_joined_emoji_in_code_at_the_edge_of_the_width_loses_no_text():
    """The highlighter split 👨‍👩‍👧‍👦 into one token per emoji; rich measured them 8 cells wide
    where the wrapped line counted 2, and cut 6 cells off the line's end: `](http` vanished."""
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"
    screen = shown(f"```python\n- {family}[l](http://x.example/u1)\n```\n", 12)
    assert f"{family}[l](http://x.example/u1)" in "".join(screen.split())


def test_plain_stream_writes_raw_deltas():
    out = io.StringIO()
    stream = PlainStream(out)
    for piece in ["# Ti", "tle\n\n**b", "old** 中文"]:
        stream.feed(piece)
    assert out.getvalue() == "# Title\n\n**bold** 中文"
    assert stream.finish() == "# Title\n\n**bold** 中文\n"
    assert stream.finish() == "# Title\n\n**bold** 中文\n"
    assert out.getvalue() == "# Title\n\n**bold** 中文\n"


def test_plain_stream_adds_no_newline_when_there_is_one_or_no_text():
    out = io.StringIO()
    stream = PlainStream(out)
    stream.feed("done\n")
    stream.finish()
    assert out.getvalue() == "done\n"
    empty = io.StringIO()
    PlainStream(empty).finish()
    assert empty.getvalue() == ""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_choose_stream():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(choose_stream(terminal, plain=False, env={"TERM": "xterm"}), MarkdownStream)
    assert isinstance(choose_stream(terminal, plain=True, env={"TERM": "xterm"}), PlainStream)
    assert isinstance(choose_stream(terminal, plain=False, env={"TERM": "dumb"}), PlainStream)
    assert isinstance(choose_stream(pipe, plain=False, env={}), PlainStream)
    assert isinstance(choose_stream(io.StringIO(), plain=False, env={}), PlainStream)
    assert isinstance(choose_stream(FakeTTY(), plain=False, env={"TERM": "xterm"}), MarkdownStream)
    assert isinstance(choose_stream(FakeTTY(), plain=False, env={"TERM": "dumb"}), PlainStream)
    plain = choose_stream(pipe, plain=False, env={})
    assert plain.file is pipe.file


def test_a_columns_of_zero_counts_as_unset(monkeypatch):
    # COLUMNS=0 (set where the size is unknown) made rich's width 0: nothing was printed at all, so
    # a script's transcript was lost with status 0
    monkeypatch.setenv("COLUMNS", "0")
    monkeypatch.setenv("LINES", "0")
    out = io.StringIO()
    make_console(out).print("hello")
    assert out.getvalue() == "hello\n"


def test_a_columns_past_any_screen_counts_as_unset():
    # rich padded each line of an answer to COLUMNS=99999999999 in a terminal: MemoryError, a traceback
    for huge in ("99999999999", "10001"):
        console = make_console(FakeTTY(), env={"COLUMNS": huge, "LINES": huge})
        assert console.width < 10_000 and console.height < 10_000
    assert make_console(FakeTTY(), env={"COLUMNS": "300", "LINES": "90"}).size == (300, 90)  # a real size is kept

def test_no_color():
    assert make_console(io.StringIO(), env={"NO_COLOR": "1"}).no_color
    assert make_console(io.StringIO(), color="never", env={}).no_color
    assert not make_console(io.StringIO(), env={}).no_color
    assert make_console(io.StringIO(), color="always", env={}).is_terminal
    # colours into a file: Markdown in colour, but no spinner or live tail (their cursor moves)
    assert not make_console(io.StringIO(), color="always", env={}).is_interactive
    assert make_console(FakeTTY(), color="always", env={}).is_interactive

    # CI runners set FORCE_COLOR or TTY_COMPATIBLE: rich took either as a terminal, so a transcript
    # into a pipe held spinner frames and erasures, and --plain (colour never) still wrote bold
    for forced in ({"FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "1"}, {"FORCE_COLOR": "1", "TTY_INTERACTIVE": "1"}):
        coloured = make_console(io.StringIO(), env=forced)
        assert coloured.is_terminal and not coloured.is_interactive  # as color "always": colours, no live display
        for color, env in (("never", forced), ("auto", {**forced, "NO_COLOR": "1"})):
            out = io.StringIO()
            console = make_console(out, color=color, env=env)
            assert not console.is_terminal and not console.is_interactive
            console.print("[bold]bold[/] [dim]dim[/]")
            assert out.getvalue() == "bold dim\n"

    out = FakeTTY()
    stream = choose_stream(out, plain=False, env={"TERM": "xterm-256color", "NO_COLOR": "1"})
    assert isinstance(stream, MarkdownStream)
    stream.feed("Some **bold** and `code`.\n\n```python\nprint('hi')\n```\n")
    stream.finish()
    assert "\x1b[3" not in out.getvalue() and "\x1b[38" not in out.getvalue()  # no colours


# --- summary lines -----------------------------------------------------------------------------


def test_format_stats_full_line():
    timing = {
        "vision_s": 0.41,
        "prefill_tokens": 2310,
        "prefill_s": 2310 / 5120,
        "ttft_s": 0.52,
        "decode_tokens": 413,
        "decode_s": 10.0,
        "decode_tokens_per_s": 41.3,
    }
    line = format_stats(timing, {"prompt_tokens": 2310, "completion_tokens": 413}, 2480, 8192, int(1.2 * 2**30), "cuda:0")
    assert line == (
        "vision 0.41 s · prefill 2,310 tok @ 5,120 tok/s · ttft 0.52 s · decode 41.3 tok/s · "
        "context 2,480/8,192 (30 %) · peak 1.2 GiB GPU"
    )


@pytest.mark.parametrize(
    "timing, usage, context, peak, device, expected",
    [
        ({}, {}, (None, None), None, None, ""),
        ({"ttft_s": 1.234}, None, (None, None), None, None, "ttft 1.23 s"),
        ({"vision_s": 0.0, "ttft_s": 0.1}, None, (None, None), None, None, "ttft 0.10 s"),
        ({"decode_tokens": 100, "decode_s": 4.0}, None, (None, None), None, None, "decode 25.0 tok/s"),
        ({"decode_s": 2.0}, {"completion_tokens": 300}, (None, None), None, None, "decode 150 tok/s"),
        # one token, or a server's answer cut after its first piece: it said "decode 0.0 tok/s"
        ({"ttft_s": 0.5, "decode_tokens": 0, "decode_s": 0.0, "decode_tokens_per_s": 0.0}, None, (None, None), None,
         None, "ttft 0.50 s"),  # fmt: skip
        ({"prefill_tokens": 12}, None, (None, None), None, None, "prefill 12 tok"),
        ({"prefill_s": 12.345}, None, (None, None), None, None, "prefill 12.3 s"),
        ({}, None, (7, 8192), None, None, "context 7/8,192 (0 %)"),
        ({}, None, (4096, 8192), 300 * 2**20, "cpu", "context 4,096/8,192 (50 %) · peak 300 MiB RAM"),
        ({}, None, (None, None), 3 * 2**30, None, "peak 3.0 GiB"),
    ],
)
def test_format_stats_leaves_out_what_is_missing(timing, usage, context, peak, device, expected):
    assert format_stats(timing, usage, context[0], context[1], peak, device) == expected


def test_the_stats_line_prefers_the_decode_rate_a_server_measured_and_says_so():
    """With a tiny fast model on llama-server the line said `decode 15,045 tok/s`, the server's own
    `predicted_per_second` being 932: the client reads pieces that arrive buffered in a burst. A
    server's own rate is shown, labelled; without one the client's measure stays."""
    timing = {"ttft_s": 0.02, "decode_tokens": 63, "decode_s": 63 / 15045.1, "decode_tokens_per_s": 15045.1,
              "server": {"prompt_tokens": 812, "predicted_n": 64, "predicted_ms": 68.7, "predicted_per_second": 932.0}}
    assert format_stats(timing) == "ttft 0.02 s · decode 932 tok/s (server) · server: prompt 812 tok"
    # a server's rate of 0 (no time measured) or an answer of one token: as without one
    assert format_stats({**timing, "server": {"predicted_per_second": 0.0}}) == "ttft 0.02 s · decode 15,045 tok/s"
    one = {"ttft_s": 0.02, "decode_tokens": 0, "decode_s": 0.0, "server": {"predicted_per_second": 50.0}}
    assert format_stats(one) == "ttft 0.02 s"
    narrow = format_stats(timing, width=30)
    assert narrow == "decode 932 tok/s (server)"


def test_stats_rows_label_the_clients_decode_rate_as_received_where_the_server_measured_its_own():
    """/stats showed `decode  63 tokens in 0.004 s (15,045.1 tok/s)` beside the server's 932: the
    client's number is how fast the pieces arrived, and says so where the server measured its own."""
    from types import SimpleNamespace

    from internvl_chat.chat.conversation import BackendInfo
    from internvl_chat.ui.stats_table import stats_rows

    info = BackendInfo("m", "http://h/v1 (llama.cpp)", "m", 4096)
    timing = {"ttft_s": 0.02, "decode_tokens": 63, "decode_s": 63 / 15045.1, "decode_tokens_per_s": 15045.1,
              "server": {"predicted_per_second": 932.0}}
    turn = SimpleNamespace(timing=timing, finish_reason="stop", answer_tokens=64)
    rows = dict(stats_rows(turn, info, 900, 4096, "", None))
    assert rows["decode (as received)"] == "63 tokens in 0.004 s (15,045.1 tok/s)" and "decode" not in rows
    assert rows["server reports"] == "decode 932.0 tok/s"
    rows = dict(stats_rows(SimpleNamespace(**{**vars(turn), "timing": {**timing, "server": {}}}), info, 900, 4096, "", None))
    assert rows["decode"] == "63 tokens in 0.004 s (15,045.1 tok/s)"


@pytest.mark.parametrize(
    "args, expected",
    [
        (("image", "cat.jpg", (1920, 1080), 9, 2304, 0.14), "+ image cat.jpg 1920×1080 → 9 tiles · 2,304 tokens · context 14 %"),
        (("video", "clip.mp4", 8, 8, 2048, 0.25), "+ video clip.mp4 8 frames → 8 tiles · 2,048 tokens · context 25 %"),
        (("image", "tiny.png", (64, 64), 1, 256, None), "+ image tiny.png 64×64 → 1 tile · 256 tokens"),
        (("image", "猫.png", None, None, None, None), "+ image 猫.png"),
        (("video", "a.mp4", "0:10–0:20", 4, 1024, 0.125), "+ video a.mp4 0:10–0:20 → 4 tiles · 1,024 tokens · context 13 %"),
    ],
)
def test_format_attach_line(args, expected):
    assert format_attach_line(*args) == expected


def test_format_attach_line_takes_a_path_name(tmp_path):
    assert format_attach_line("image", tmp_path / "x.png", (2, 3), 1, 256, 0.5).startswith("+ image x.png 2×3 → ")


def test_a_columns_in_other_digits_counts_as_unset():
    # COLUMNS=² passed isdigit() and int() raised: a traceback before anything started
    for odd in ("²", "١٠٠"):
        console = make_console(FakeTTY(), env={"COLUMNS": odd, "LINES": odd})
        assert console.size == make_console(FakeTTY(), env={}).size


@pytest.mark.parametrize("marker", ["- ", "1. ", "> - "])
def test_a_table_row_longer_than_its_header_in_a_list_item_loses_no_cell(marker):
    """A table on a list item's first line: its header line holds the marker (`- | a | b |`),
    counted as a cell, so a row one cell longer than the header still lost its last cell."""
    pad = " " * len(marker) if marker != "> - " else ">   "
    doc = f"{marker}| a | b |\n{pad}|---|---|\n{pad}| 1 | 2 | SECRET |\n"
    assert "SECRET" in shown(doc)


@pytest.mark.parametrize("rows, cell", [(150, "text"), (12, "words " * 60)], ids=["many rows", "long rows"])
def test_the_live_tail_of_a_long_table_is_still_a_table(rows, cell):
    """A table past two screens of rows (or LIVE_TAIL_CHARS) is previewed from its end with its
    header and delimiter rows kept, as a code block keeps its fence: without them its last rows
    were drawn as a paragraph of raw `| a | b |` text until the table ended."""
    header = "| name | description |\n|---|:---:|\n"
    body = "".join(f"| row{i} | {cell} {i} |\n" for i in range(rows))
    splitter = BlockSplitter()
    splitter.feed("Intro\n" + header + body)
    preview = splitter.preview(render.LIVE_TAIL_CHARS, 40)
    assert preview.startswith(header) and preview.endswith(f"| row{rows - 1} | {cell} {rows - 1} |\n")
    out = io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    stream = MarkdownStream(console, refresh_interval_s=0)
    for line in (header + body).splitlines(keepends=True):
        stream.feed(line)
    screen = emulate_terminal(out.getvalue(), width=60, height=20)  # the last frame, the table unfinished
    assert f"row{rows - 1}" in screen and "|" not in screen
    stream.finish()
    expected = Console(file=io.StringIO(), width=60, record=True, force_terminal=False)
    expected.print(Markdown(header + body))
    want = "\n".join(line.rstrip() for line in expected.export_text().splitlines()).strip("\n")
    assert emulate_terminal(out.getvalue(), width=60, height=rows * 20) == want  # the whole table once, at the end
