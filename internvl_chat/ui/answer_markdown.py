"""rich's Markdown for an answer, which is untrusted text: every word of it reaches the screen.

rich drops raw HTML (`if x<y and y>z` lost `<y and y>`) and a link's title, draws an image as its
alt text apart from the words around it with its target hidden, cuts table cells with … and drops
columns that do not fit, renders nothing of a quote or list nested deeper than the width leaves
room for, cuts the end off a highlighted code line holding a joined emoji, and markdown-it drops
what is nested deeper than its limit and the cells of a table row past its header's. Here HTML is
text, an image is shown like a link (`🌆 alt (target)`), a link's title with its target, a bidi
override written as an entity is escaped as answer_text.py escapes one written as itself, table
cells wrap, such code is not highlighted, and a block that cannot be shown whole (a table with a
row longer than its header too) is shown as its plain text.
"""

from __future__ import annotations

import re
from typing import Iterable

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markdown import CodeBlock, Markdown, TableElement
from rich.table import Table
from rich.text import Text

from ..files import GLYPHS_OR_ESCAPES, can_encode
from .answer_text import sanitize

MIN_CONTENT_WIDTH = 8  # cells left for the innermost text of nested quotes and lists, else plain text
_QUOTE_WIDTH, _BULLET_WIDTH = 4, 3  # what rich's quote and bullet take from the width
_CODE_PADDING = 2  # rich's code block pads its lines with a cell on each side
_OWN_BLANK_LINE = ("bullet_list_open", "ordered_list_open", "blockquote_open")  # rich starts them with one
_MIN_COLUMN_WIDTH = 4  # cells per table column (its text, padding and a margin); with 3, rich gave some no room


# no reference definitions: an answer is printed block by block, so `[a]: url` would vanish and
# `[a]` in a later block name nothing; both stay text
_PARSER = MarkdownIt("commonmark", {"html": False}).enable("strikethrough").enable("table").disable("reference")


class _Table(TableElement):
    """A table whose cells wrap a word too long for its column (rich cut it with …), or its rows as
    plain text when its columns cannot all get room."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = [self.header.row] if self.header is not None and self.header.row is not None else []
        rows += self.body.rows if self.body is not None else []
        columns = max((len(row.cells) for row in rows), default=0)
        if columns * _MIN_COLUMN_WIDTH > options.max_width:
            yield Text("\n".join(" | ".join(cell.content.plain for cell in row.cells) for row in rows))
            return
        for renderable in super().__rich_console__(console, options):
            if isinstance(renderable, Table):
                for column in renderable.columns:
                    column.overflow = "fold"
            yield renderable


class _CodeBlock(CodeBlock):
    """Code not highlighted where an emoji is joined (ZWJ): a highlighter split the sequence into
    tokens, each measured as wide as its emoji, and rich cut the line's end off to fit."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if "\u200d" in self.text.plain:
            self.lexer_name = "text"
        yield from super().__rich_console__(console, options)


class AnswerMarkdown(Markdown):
    elements = {**Markdown.elements, "table_open": _Table, "fence": _CodeBlock, "code_block": _CodeBlock}

    def __init__(self, markup: str, code_theme: str = "monokai", written_as: str | None = None) -> None:
        # hyperlinks=False: a link's target is printed beside its words, never hidden in an OSC 8
        # link that a click would follow
        super().__init__("", code_theme=code_theme, hyperlinks=False)
        self.markup = markup
        self._written_as = written_as  # an output encoding the text is laid out as written in (None: as it is)
        self.parsed = _PARSER.parse(markup)
        for token in self.parsed:
            if token.children:
                token.children = list(_images_as_links(_entities_inert(token.children)))
        if written_as:  # after parsing: "· item" stays a paragraph, not a list item as "- item" would be
            _as_written(self.parsed, written_as)
        self._indent = _nested_width(self.parsed)
        self._cut_short = any(token.level >= _PARSER.options["maxNesting"] - 2 for token in self.parsed)
        self._cut_short = self._cut_short or _drops_cells(self.parsed, markup)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self._written_as and not can_encode(options.encoding, _IMAGE_MARK):
            # an ASCII terminal: "…" written as "..." by the stream's error handler, after rich padded
            # the line to the width, made it wrap (a blank row, the live tail's rows miscounted);
            # measured as written instead (so is "é", written as `\\xe9`)
            yield from AnswerMarkdown(self.markup, self.code_theme, written_as=options.encoding).__rich_console__(console, options)
            return
        if self._cut_short or (self._indent and options.max_width - self._indent < MIN_CONTENT_WIDTH):
            if self.parsed and self.parsed[0].type in _OWN_BLANK_LINE:
                yield Text("")  # as rich draws them, with the blank line before them that they bring
            yield Text(self.markup.strip("\n"))
            return
        yield from super().__rich_console__(console, options)


def _entities_inert(tokens: list[Token]) -> list[Token]:
    """Text as answer_text.py shows it, also where an entity wrote it: `&#x202e;` became a bidi
    override the answer's own text could not hold (markdown-it made C0 and C1 ones U+FFFD)."""
    for token in tokens:
        token.content = sanitize(token.content)
        if token.children:
            _entities_inert(token.children)
    return tokens


_IMAGE_MARK = "\U0001f306 "


def _as_written(tokens: list[Token], encoding: str) -> None:
    """The text of parsed tokens (words, inline and block code) as a stream of `encoding` writes it
    (cli.py's error handler, `files.GLYPHS_OR_ESCAPES`): `files.ASCII_GLYPHS` in place, and any other
    character it cannot hold as its escape, so rich lays out what is written."""
    for token in tokens:
        if token.type in ("text", "code_inline", "fence", "code_block") and token.content:
            token.content = token.content.encode(encoding, GLYPHS_OR_ESCAPES).decode(encoding)
        if token.children:
            _as_written(token.children, encoding)


def _images_as_links(tokens: list[Token]) -> Iterable[Token]:
    """`![alt](target)` as the marker, then `[alt](target)`, where it stands in the text; a link's
    title (an image's too) shown with its target."""
    for token in tokens:
        if token.type != "image":
            yield _with_title(token, token) if token.type == "link_open" else token
            continue
        yield Token("text", "", 0, content=_IMAGE_MARK)
        yield _with_title(Token("link_open", "a", 1, attrs={"href": str(token.attrs.get("src", ""))}), token)
        yield from _images_as_links(token.children or [])
        yield Token("link_close", "a", -1)


_CELL_BORDER = re.compile(r"(?<!\\)\|")  # a pipe not escaped, as markdown-it splits a row


def _cells(line: str) -> list[str]:
    """A table row's cells (a quote's `>` before it left out)."""
    cells = _CELL_BORDER.split(line.strip().lstrip("> \t"))
    if cells and not cells[0]:
        cells.pop(0)
    if cells and not cells[-1]:
        cells.pop()
    return cells


def _drops_cells(tokens: list[Token], markup: str) -> bool:
    """A table has a row with more cells than its header: markdown-it drops the rest, text and all."""
    lines = markup.split("\n")
    for token in tokens:
        if token.type == "table_open" and token.map:
            start, end = token.map
            columns = len(_cells(lines[start + 1]))  # the delimiter row: the header line may hold a list marker
            if any(cell.strip() for line in lines[start + 2 : end] for cell in _cells(line)[columns:]):
                return True
    return False


def _with_title(link: Token, source: Token) -> Token:
    """A link whose target is shown with the title `source` gives it (`[a](u "title")`: rich shows
    `a (u)` and no title, words of the answer never seen)."""
    title = sanitize(str(source.attrs.get("title", "")))
    if title:
        link.attrs["href"] = f'{link.attrs.get("href", "")} "{title}"'
    return link


def _nested_width(tokens: list[Token]) -> int:
    """The most cells that quotes, list markers and code padding take from the width of the text inside them."""
    items: dict[int, int] = {}  # a list's opening token -> its item count (an ordered list's numbers are as wide as the last)
    lists: list[int] = []
    for i, token in enumerate(tokens):
        if token.type in ("bullet_list_open", "ordered_list_open"):
            lists.append(i)
            items[i] = 0
        elif token.type == "list_item_open" and lists:
            items[lists[-1]] += 1
        elif token.type in ("bullet_list_close", "ordered_list_close") and lists:
            lists.pop()
    widths: list[int] = []
    deepest = 0
    for i, token in enumerate(tokens):
        if token.type == "blockquote_open":
            widths.append(_QUOTE_WIDTH)
        elif token.type == "bullet_list_open":
            widths.append(_BULLET_WIDTH)
        elif token.type == "ordered_list_open":  # as rich numbers it: the last number, then ". "
            widths.append(len(str(int(token.attrs.get("start", 1)) + items[i])) + 2)
        elif token.type in ("blockquote_close", "bullet_list_close", "ordered_list_close") and widths:
            widths.pop()
        deepest = max(deepest, sum(widths) + (_CODE_PADDING if token.type in ("fence", "code_block") else 0))
    return deepest
