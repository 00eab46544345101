"""`/export`'s Markdown: the conversation written so that a viewer of the file fetches nothing, no
message fakes a turn, and an answer cut short says why."""

from __future__ import annotations

import functools
import re
import unicodedata
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..chat.conversation import Conversation
from ..chat.session_file import CANCELLED_MARK
from ..files import real_path, visible, visible_file_name, visible_lines
from .answer_text import sanitize

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token


@functools.cache
def _parsers() -> tuple[MarkdownIt, MarkdownIt, MarkdownIt]:
    """(blocks, viewer, viewer_blocks), made at the first /export, not as the app starts (whose
    Markdown stack is imported only once an answer streams, render.py).
    - blocks: a message's blocks as a viewer of the export reads them (where its code is); HTML off,
      as the export writes no raw HTML outside code; blocks only (the inline parse, most of the
      time, unused)
    - viewer: one that reads more (GitHub's: HTML, tables): what `export_block` writes is checked with it
    - viewer_blocks: its blocks only (cheap): where a fence left open ends"""
    from markdown_it import MarkdownIt

    return (MarkdownIt("commonmark", {"html": False}).disable("inline"),
            MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough"),
            MarkdownIt("commonmark", {"html": True}).enable("table").disable("inline"))  # fmt: skip


_OWN_HEADINGS = ("conversation", "system", "user", "assistant")
# the passes that escape fake headings one by one (an escape may begin another, rarely) before
# every line that could underline a heading is escaped at once
_HEADING_PASSES = 4
# a line that can underline a heading (setext), in a quote or list item too
_UNDERLINE = re.compile(r"^([ \t>]*)((?:=+|-+)[ \t]*)$")


_CODE_RUN = re.compile(r"`+")
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")  # a tag, a comment, a declaration: raw HTML
_IMAGE_START = re.compile(r"!\[")
_NUMERIC_ENTITY = re.compile(r"&#(?:[xX]([0-9a-fA-F]{1,6})|([0-9]{1,7}));")
# the export's own headings (`export_markdown`): a message line reading as one started a turn of its own
_EXPORT_HEADING = re.compile(r"^( {0,3})(#{1,6}[ \t]+(?:Conversation|System|User|Assistant)[ \t#]*)$", re.IGNORECASE)


def _inert_line(line: str, spans: bool = True) -> str:
    """One line outside code blocks with raw HTML, image syntax and the export's own headings made
    text; code spans kept (with `spans`, else made inert too)."""
    line = _EXPORT_HEADING.sub(r"\1\\\2", line)  # `\## User`: shown as text, not a heading
    out, i, look = [], 0, 0
    while True:
        m = _CODE_RUN.search(line, look) if spans else None
        start = m.start() if m else len(line)
        if m and _escaped(line, start):  # "\`": a backtick as text; the rest of its run may open a span
            start += 1
            if start == m.end():
                look = m.end()
                continue
        out.append(_inert_text(line[i:start]))
        if m is None:
            return "".join(out)
        close = re.compile(rf"(?<!`){line[start : m.end()]}(?!`)").search(line, m.end())
        stop = close.end() if close else m.end()  # no closing run: the backticks are plain text
        out.append(line[start:stop])
        i = look = stop


def _inert_text(text: str) -> str:
    """Text outside code: raw HTML and image syntax written as text, and an entity that a viewer
    would turn into a bidi override or a control (`&#x202e;`) written as its own text."""
    text = _IMAGE_START.sub("&#33;[", _HTML_START.sub("&lt;", text))
    return _NUMERIC_ENTITY.sub(lambda m: ("&amp;" if _hidden_code(m) else "&") + m.group()[1:], text)


def _hidden_code(entity: re.Match) -> bool:
    code = int(entity.group(1), 16) if entity.group(1) else int(entity.group(2))
    return code < 0x110000 and sanitize(chr(code)) != chr(code)


def _escaped(line: str, at: int) -> bool:
    """The character at `at` is backslash-escaped (an odd run of backslashes before it)."""
    return (at - len(line[:at].rstrip("\\"))) % 2 == 1


def _live(tokens: list[Token]) -> bool:
    """A viewer of the Markdown parsed as `tokens` would fetch something (an image) or show raw HTML."""
    return any(_live_token(token) for token in tokens)


def _live_token(token: Token) -> bool:
    return token.type in ("html_block", "html_inline", "image") or any(map(_live_token, token.children or []))


def _fake_headings(tokens: list[Token]) -> list[tuple[int, bool]]:
    """The headings of the Markdown parsed as `tokens` that read as one of the export's own
    (`## &#85;ser`, `User` over `---`): (the line to escape, whether it is a setext underline)."""
    found = []
    for heading, inline in zip(tokens, tokens[1:]):
        if heading.type != "heading_open" or not heading.map:
            continue
        words = "".join(child.content for child in inline.children or [] if child.type in ("text", "text_special", "code_inline"))
        words = "".join(c for c in words if unicodedata.category(c) != "Cf").strip(" \t#").casefold()
        if words in _OWN_HEADINGS:
            setext = heading.markup[:1] in ("=", "-")
            found.append((heading.map[1] - 1 if setext else heading.map[0], setext))
    return found


def _unfake(line: str, setext: bool) -> str:
    """A heading's line written as text: a backslash before its `#` marks, or before its underline."""
    at = len(line) - len(line.lstrip(" >")) if setext else line.find("#")
    return line[:at] + "\\" + line[at:] if at >= 0 else line


def _closed_by(parser: MarkdownIt, markdown: str, fence: Token) -> bool:
    """`fence` (of `markdown`) is open to the end, and `parser` reads its markup on a line after
    the end as its closing fence."""
    end = markdown.count("\n") + 2
    tokens = parser.parse(markdown + "\n" + fence.markup)
    return any(t.type == "fence" and t.map == [fence.map[0], end] for t in tokens)


def export_block(text: str) -> str:
    """`text` (a message, an answer) as a safe part of an export's Markdown.

    Raw HTML and images are written as text (`&lt;img …`, `&#33;[…](…)`): a viewer showing the
    export fetched `![](https://host/?q=…)` or `<img src=…>` from the network, a channel out for
    what a hostile picture or page made the model write. A line that reads as one of the export's
    own headings (`## User`) is written as text: it faked a turn. Code is left as written. A code fence
    left open (an answer cut short by max_new_tokens or Ctrl-C) is closed at the end: open, it
    turned every later heading of the export into code.

    Which lines are code is what a CommonMark parser finds (`_parsers`' blocks), not a guess line by line:
    a fence inside a list item (`- ```…`) ends with its item, and a tracker that took its
    closing line for an opening one left the images and HTML after it live (fetched), and the
    fence it then "closed" at the end swallowed the rest of the export.
    """
    lines = text.split("\n")
    tokens = _parsers()[0].parse(text)
    code: set[int] = set()
    for token in tokens:
        if token.type in ("fence", "code_block") and token.map:
            code.update(range(*token.map))
    # where a code span as this line-by-line reading took it is none to the viewer (one over two
    # lines, or split by a table's `|`), the lines of the paragraph or table row where something
    # stayed live are made inert, spans too; if that leaves something live, every line but code's
    everywhere = set(range(len(lines)))
    no_spans: set[int] = set()
    while True:
        out = [line if i in code else _inert_line(line, i not in no_spans) for i, line in enumerate(lines)]
        for passes in range(len(lines) + _HEADING_PASSES + 1):
            viewed = _parsers()[1].parse("\n".join(out))  # one parse for both checks where nothing is escaped
            fakes = _fake_headings(viewed)
            if not fakes:
                break
            if passes == _HEADING_PASSES:
                # each escape ended one fake heading and began another (`User\n===\n===`, repeated):
                # a parse per heading took minutes; every underline is written as text at once
                out = [line if i in code else _UNDERLINE.sub(r"\1\\\2", line) for i, line in enumerate(out)]
                continue
            for at, setext in fakes:
                out[at] = _unfake(out[at], setext)
        else:
            viewed = _parsers()[1].parse("\n".join(out))
        if not _live(viewed):
            break
        # an escaped heading no longer ends its paragraph: an indented code block after it
        # (`User\n=\n    <b>`) became the paragraph's text, left live; such lines are made inert too
        viewer_code = {i for token in viewed if token.type in ("fence", "code_block") and token.map for i in range(*token.map)}
        if code - viewer_code:
            code &= viewer_code
            continue
        if no_spans == everywhere:
            break
        live = {i for token in viewed if token.map and _live_token(token) for i in range(*token.map)}
        no_spans = live if live and not no_spans else everywhere
    # the last fence may be open to the end: closed by its own fence when that closes it (a
    # top-level one; one in a list or quote ends with it, at the export's next line). As the
    # viewer reads the blocks: markdown-it tries tables first, and `~~~|-` over `-|-` is a table
    # there, so the `~~~` "closing" it opened a fence that held the rest of the export
    exported = "\n".join(out)
    fences = [token for token in viewed if token.type == "fence" and token.map]  # `viewed`: `exported` parsed
    reaches_end = fences and fences[-1].map[1] > exported.rstrip().count("\n")  # else closed before it
    if reaches_end and _closed_by(_parsers()[2], exported, fences[-1]):
        out.append(fences[-1].markup)
    return "\n".join(out)


# Why an answer that did not end by itself stopped (its finish_reason), as an export and /load say it:
# a reader must not take the part for the whole answer
CUT_SHORT = {
    "length": "it reached the length limit",  # max_new_tokens, the context, or a server's answer bounds
    "cancelled": "cancelled by the user",
    "error": "it broke off with an error",  # a server's stream broke in the middle (finish_reason "error")
}


def answer_and_cut(turn: Any) -> tuple[str, str | None]:
    """(an answer's text, why it was cut short or None when it ended by itself).

    The " [cancelled]" the app adds to a cancelled answer is left off: the reason says it, and in
    an export it stood inside the code block the answer was cut in."""
    reason = CUT_SHORT.get(turn.finish_reason)
    text = turn.answer_text
    if turn.finish_reason == "cancelled" and text.endswith(CANCELLED_MARK):
        text = text.removesuffix(CANCELLED_MARK).removesuffix(" ")
    return text, reason


def markdown_link(label: str, target: str, image: bool = False) -> str:
    """A Markdown link to a local file: a `]` in the label or a `>` in the target (any file name
    may hold them) ended the link early, and the rest of the name became Markdown."""
    label = re.sub(r"([\\\[\]])", r"\\\1", label)
    target = re.sub(r"([\\<>])", r"\\\1", target)
    return f"{'!' if image else ''}[{label}](<{target}>)"


def export_markdown(conversation: Conversation) -> str:
    """The conversation as Markdown: media as links, answers as written but for raw HTML and
    images (see `export_block`).

    Text from the model or a loaded session file can hold terminal escapes, bidi overrides or
    other controls; each is written as the terminal shows it (answers as they stream, the rest
    as /show shows it), so `cat` on the file runs none of them.

    An answer that did not end by itself (cut by a length limit, Ctrl-C or a broken server
    stream) is followed by a line that says so (`CUT_SHORT`).
    """
    model = visible(conversation.describe().model)
    lines = ["# Conversation", "", f"- model: `{model}`", f"- exported: {datetime.now():%Y-%m-%d %H:%M}", ""]
    if conversation.system_message:
        lines += ["## System", "", export_block(visible_lines(conversation.system_message)), ""]
    for turn in conversation.turns:
        lines += ["## User", ""]
        for media in turn.media:
            name, target = visible(media.path.name), visible_file_name(str(real_path(media.path)))
            if media.kind == "image":
                lines.append(markdown_link(name, target, image=True))
            else:
                lines.append(markdown_link(f"video: {name}, {media.tiles} frames", target))
        if turn.media:
            lines.append("")
        answer, cut = answer_and_cut(turn)
        lines += [export_block(visible_lines(turn.user_text)), "", "## Assistant", ""]
        if cut is None:
            lines += [export_block(sanitize(answer)), ""]
        else:  # a paragraph of its own, after any code block export_block closed; no [ ]: an
            # answer's `[answer cut short]: url` would make it a link
            lines += [export_block(sanitize(answer)).rstrip("\n"), "", f"*(answer cut short: {cut})*", ""]
    return "\n".join(lines)
