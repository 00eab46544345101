"""`/export`'s Markdown: the conversation written so that a viewer of the file fetches nothing, no
message fakes a turn, and an answer cut short says why."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from ..chat.conversation import Conversation
from ..chat.session_file import CANCELLED_MARK
from ..files import real_path, visible, visible_file_name, visible_lines
from .answer_text import sanitize


# A code fence: up to 3 spaces, then 3 or more backticks or tildes (CommonMark).
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


_CODE_RUN = re.compile(r"`+")
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")  # a tag, a comment, a declaration: raw HTML
_IMAGE_START = re.compile(r"!\[")
# the export's own headings (`export_markdown`): a message line reading as one started a turn of its own
_EXPORT_HEADING = re.compile(r"^( {0,3})(#{1,6}[ \t]+(?:Conversation|System|User|Assistant)[ \t#]*)$", re.IGNORECASE)


def _inert_line(line: str) -> str:
    """One line outside code blocks with raw HTML, image syntax and the export's own headings made
    text; code spans kept."""
    line = _EXPORT_HEADING.sub(r"\1\\\2", line)  # `\## User`: shown as text, not a heading
    out, i = [], 0
    while True:
        m = _CODE_RUN.search(line, i)
        end = m.start() if m else len(line)
        out.append(_IMAGE_START.sub("&#33;[", _HTML_START.sub("&lt;", line[i:end])))
        if m is None:
            return "".join(out)
        close = re.compile(rf"(?<!`){m.group()}(?!`)").search(line, m.end())
        stop = close.end() if close else m.end()  # no closing run: the backticks are plain text
        out.append(line[m.start() : stop])
        i = stop


def export_block(text: str) -> str:
    """`text` (a message, an answer) as a safe part of an export's Markdown.

    Raw HTML and images are written as text (`&lt;img …`, `&#33;[…](…)`): a viewer showing the
    export fetched `![](https://host/?q=…)` or `<img src=…>` from the network, a channel out for
    what a hostile picture or page made the model write. A line that reads as one of the export's
    own headings (`## User`) is written as text: it faked a turn. Code is left as written. A code fence
    left open (an answer cut short by max_new_tokens or Ctrl-C) is closed at the end: open, it
    turned every later heading of the export into code.
    """
    open_fence = None
    lines = []
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if open_fence is not None:
            if m and m.group(1)[0] == open_fence[0] and len(m.group(1)) >= len(open_fence) and not line[m.end() :].strip():
                open_fence = None
            lines.append(line)
        elif m and not (m.group(1)[0] == "`" and "`" in line[m.end() :]):  # a backtick after ``` makes it inline code
            open_fence = m.group(1)
            lines.append(line)
        else:
            lines.append(_inert_line(line))
    if open_fence is not None:
        lines.append(open_fence)
    return "\n".join(lines)


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
