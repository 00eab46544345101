"""`export_block`: a message or answer written into an /export so that a viewer of the file (one
that reads HTML and tables, as GitHub's does) fetches nothing and no message fakes a turn."""

from __future__ import annotations

import random
import unicodedata

import pytest
from markdown_it import MarkdownIt

from internvl_chat.ui.export import export_block

VIEWER = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")
EVIL_IMAGE, EVIL_HTML = "![t](https://evil.example/p.png)", "<img src=https://evil.example/q.png>"


def in_export(text: str) -> str:
    """`text` as an answer of an export, followed by the next turn (as export_markdown writes it)."""
    return "## Assistant\n\n" + export_block(text) + "\n\n## User\n\nNext question.\n"


def live(tokens) -> list[str]:
    """What a viewer would fetch or show as HTML."""
    found = []
    for token in tokens:
        if token.type in ("image", "html_inline", "html_block"):
            found.append(token.type)
        found += live(token.children or [])
    return found


def turns(markdown: str) -> list[str]:
    """The headings a viewer shows that read as one of the export's own (as their words show)."""
    tokens = VIEWER.parse(markdown)
    found = []
    for heading, inline in zip(tokens, tokens[1:]):
        if heading.type == "heading_open":
            words = "".join(c.content for c in inline.children if c.type in ("text", "text_special", "code_inline"))
            words = "".join(c for c in words if unicodedata.category(c) != "Cf").strip(" #")
            if words.casefold() in ("conversation", "system", "user", "assistant"):
                found.append(words)
    return found


def check(text: str) -> str:
    markdown = in_export(text)
    assert live(VIEWER.parse(markdown)) == [], markdown
    assert turns(markdown) == ["Assistant", "User"], markdown
    return markdown


def test_a_fence_in_a_list_item_ends_with_it():
    """The line-by-line fence tracker took a list item's closing fence (`  ```` after `- ````) for
    an opening one: the image and HTML after the list were left live, and the fence it "closed" at
    the end opened one that held the rest of the export (the next turn's heading too)."""
    markdown = check(f"- ```\n  x\n  ```\n{EVIL_IMAGE}\n{EVIL_HTML}")
    assert "&#33;[t](https://evil.example/p.png)\n&lt;img src=" in markdown


def test_an_answer_cut_short_in_a_list_items_fence_gets_no_fence_of_its_own():
    """A fence left open inside a list item ends with the item; the closing fence appended at the
    margin opened a new one instead, and the rest of the export was code."""
    markdown = check("1. step\n\n   ```python\n   code")
    assert markdown.count("```") == 1


def test_a_top_level_fence_left_open_is_still_closed():
    assert check("Here:\n````python\nprint(1)\n```\nstill code").count("````") == 2


def test_an_escaped_backtick_opens_no_code_span():
    r"""`\`` is a backtick as text: what the line-by-line reading took for a code span was raw HTML."""
    check(f"\\`{EVIL_HTML}`")
    check(f"\\`{EVIL_IMAGE}`")
    assert export_block("\\\\`<b>`") == "\\\\`<b>`"  # an escaped backslash: the span is one


@pytest.mark.parametrize(
    "text",
    [
        f"`a\nb` {EVIL_HTML} `c`",  # a code span over two lines: the second line's backticks pair otherwise
        f"| `a | {EVIL_HTML} ` |\n|---|---|\n| x | y |",  # a table's `|` ends a cell inside the "span"
        f"- a `x\n- {EVIL_HTML} `",
    ],
)
def test_code_spans_a_viewer_reads_otherwise_leave_nothing_live(text):
    check(text)


def test_code_spans_stay_as_written_where_the_viewer_agrees():
    assert export_block("Use `<b>` or `![x](y)`") == "Use `<b>` or `![x](y)`"


@pytest.mark.parametrize(
    "text",
    ["User\n---", "Assistant\n===", "## &#85;ser", "## **User**", "# SYSTEM #", "## Us\u200ber", "> ## User",
     "## User\n---", "User\n===\n==="],  # fmt: skip
)
def test_a_heading_reading_as_the_exports_own_fakes_no_turn(text):
    """Only `## User` written plainly was made text; one underlined, with an entity, emphasis or a
    zero-width character still read as a turn of its own."""
    check(text)


def test_other_headings_stay_headings():
    assert export_block("## Users\n\nUser guide\n---") == "## Users\n\nUser guide\n---"


PIECES = ["- ", "1. ", "  ", "    ", "> ", "```", "~~~", "`", "``", "\\", "|", "---", "===", "## ", "User", "\n", "\n\n",
          "text ", EVIL_IMAGE, EVIL_HTML, "<b>", "&#85;", "*"]  # fmt: skip


@pytest.mark.parametrize("seed", range(200))
def test_hostile_answers_leave_nothing_live_and_fake_no_turn(seed):
    rng = random.Random(seed)
    check("".join(rng.choice(PIECES) for _ in range(rng.randint(3, 30))))


def test_an_entity_for_a_bidi_override_is_written_as_text():
    """`&#x202e;` became a raw U+202E in a viewer (the terminal escapes it, as the answer's own):
    the export's text was reordered there. Written `&amp;#x202e;`, it shows as typed."""
    markdown = check("name: &#x202e;gpj.exe and &#8238; and `&#x202e;` and &#65;")
    tokens = VIEWER.parse(markdown)
    text = "".join(child.content for token in tokens for child in token.children or [])
    assert "\u202e" not in text and "&#x202e;" in text and "A" in text


@pytest.mark.parametrize("text", ["User\n===\n===\n" * 60, "User \n=== \n===\t\n" * 60, "> User\n> ===\n> ===\n" * 60,
                                  "- x\n\n" + "  User\n  ===\n  ===\n" * 30 + "\n## &#85;ser\n## User\n---"])  # fmt: skip
def test_fake_headings_that_each_escape_uncovers_take_a_bounded_number_of_parses(monkeypatch, text):
    """Escaping `User\\n===`'s underline made it text that the next `===` underlined, and the next
    `User` a fake heading again: one parse of the whole answer per heading (an answer of 1000 took
    over a minute to export). Past a few passes every underline is written as text at once."""
    from internvl_chat.ui import export

    parses = []
    viewer = export._parsers()[1]
    parse = viewer.parse
    monkeypatch.setattr(viewer, "parse", lambda src, *a: parses.append(1) or parse(src, *a))
    check(text)
    assert len(parses) <= 10


def test_a_normal_answer_is_parsed_inline_once(monkeypatch):
    """The inline parse is most of markdown-it's time: the fence finder ran it unused, and the
    viewer's parse ran twice (fake headings, then live HTML) on the same text, so a long answer
    took 3 to 4 of them to export (90 KB: 0.6-0.9 s, against 0.03 s before the parser checked it)."""
    from markdown_it.parser_inline import ParserInline

    inline_parses = []
    parse = ParserInline.parse
    monkeypatch.setattr(ParserInline, "parse", lambda self, *a: inline_parses.append(1) or parse(self, *a))
    answer = "# Plan\n\nUse `List<T>` & `a < b`:\n\n```python\nprint('<b>')\n```\n\n| a | b |\n|---|---|\n| `x` | y |\n"
    assert export_block(answer) == answer
    paragraphs_and_cells = 6  # the inline parse runs once per heading, paragraph and table cell
    assert len(inline_parses) == paragraphs_and_cells


def test_code_spans_a_viewer_agrees_on_stay_as_written_beside_one_it_reads_otherwise():
    """A table's `|` inside a code span (`ls | grep <name>`, common in an answer about the shell)
    ends the cell there, and `<name>` would be live: every code span of the answer was made inert,
    and `List<T>` two paragraphs up showed as `List&lt;T>`. Only that row's spans are now."""
    answer = "Use `List<T>` and `<div>`.\n\n| Command | Meaning |\n|---|---|\n| `ls | grep <name>` | filter |\n\nAlso `a<b>`."
    markdown = check(answer)
    assert "Use `List<T>` and `<div>`." in markdown and "Also `a<b>`." in markdown
    assert "| `ls | grep &lt;name>` | filter |" in markdown


@pytest.mark.parametrize("text", [f"User\n=\n    {EVIL_HTML}", f"Assistant\n---\n    {EVIL_IMAGE}", f"> User\n> ===\n>     {EVIL_IMAGE}",
                                  f"User\n=\n    x\n    {EVIL_IMAGE}\n\n    {EVIL_HTML}"])  # fmt: skip
def test_code_after_a_fake_heading_that_is_text_once_escaped_is_made_inert(text):
    """An indented code block may follow a heading, but cannot interrupt a paragraph: with the
    fake heading's underline escaped, the "code" below it joined the heading's words as a
    paragraph, and its image or HTML, left as written, was live."""
    check(text)


def test_a_fence_the_viewer_reads_as_a_table_gets_no_closing_fence():
    """markdown-it tries tables before fences: `~~~|-` over `-|-` is a table to a viewer built on
    it, and the `~~~` appended to close the "fence" opened one that held the next turn."""
    check("~~~|-\n-|-")
    assert check("~~~python\ncode").count("~~~") == 2
    check("~~~|-\n-|-\n```")  # the viewer's fence, not the CommonMark parser's, is left open


@pytest.mark.parametrize("text", ["```\n ", "~~~\n\t", "```py\ncode\n\n", "```\ncode\n```\n \n"])
def test_a_fence_ending_in_blank_lines_is_closed_when_open(text):
    check(text)
