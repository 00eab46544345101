"""Which part of a streamed Markdown answer is finished: `BlockSplitter`, a line at a time.

render.py prints each finished block once and keeps only the unfinished tail live; this module
decides where a block ends (a paragraph at its blank line, a fence at its closing fence, an indented
code block at the first line indented less, a list when something else starts), looking at each
line once, so each token costs the same however long the answer.
"""

from __future__ import annotations

import re

_FENCE_OPEN = re.compile(r"^(\s*)(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_TABLE_DELIMITER = re.compile(r"^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
_BLOCK_QUOTE = re.compile(r"^ {0,3}>")
_NESTED_ITEM = re.compile(r"^ *(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_ITEM_CONTENT = re.compile(r"^( *(?:[-*+]|\d{1,9}[.)]))( *)")  # a list item's marker and the spaces after it
_CODE_INDENT = 4  # a line indented this much, with no paragraph open, is an indented code block's
_LIST_CONTINUATION_INDENT = 2  # a line indented this much after a blank line stays in the list


def _indent(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip(" "))


def _content_indent(item: str) -> int:
    """Where a list item line's text starts (CommonMark: past the marker and 1 to 4 spaces; 1 past an
    empty item's marker or before text indented 5 or more, which is then code)."""
    expanded = item.expandtabs(4)
    match = _ITEM_CONTENT.match(expanded)
    if match is None:
        return 0
    spaces = len(match.group(2))
    rest = expanded[match.end() :]
    return match.end(1) + (spaces if 1 <= spaces <= 4 and rest.strip() else 1)


def _interrupts_paragraph(item: str) -> bool:
    """A list item line that starts a list under a paragraph's line (CommonMark): one with text, and
    a numbered one only from 1; else it is the paragraph's text."""
    body = item.lstrip(" ")
    number = re.match(r"\d+", body)
    text = body[number.end() + 1 if number else 1 :]
    return bool(text.strip(" \t")) and (number is None or int(number.group()) == 1)


def _partial_ends_list(partial: str) -> bool | None:
    """After a list and a blank line, does this unfinished line start something else?
    True / False, or None while too little of it is there to tell."""
    partial = partial.rstrip("\r")  # a \r may be the first half of the line's \r\n
    if not partial.strip(" \t"):
        return None
    if _indent(partial) >= _LIST_CONTINUATION_INDENT:
        return False
    body = partial.lstrip(" \t")
    if body[0] in "-*+":
        return None if len(body) == 1 else body[1] not in " \t"
    digits = re.match(r"\d{1,9}", body)
    if digits:
        rest = body[digits.end() :]
        if not rest:
            return None
        if rest[0] not in ".)":
            return True
        return None if len(rest) == 1 else rest[1] not in " \t"
    return True


def _cell_count(row: str) -> int:
    """A table row's cells, as markdown-it counts them (an unescaped pipe between, outer ones optional)."""
    cells = re.split(r"(?<!\\)\|", row.strip(" \t"))
    return len(cells) - (cells[0] == "") - (len(cells) > 1 and cells[-1] == "")


_HEAD_CHARS = 16  # of an unfinished line: all `_partial_ends_list` needs (an indent of 2, a 9-digit number)


class BlockSplitter:
    """Split streamed Markdown into finished blocks and the unfinished tail, a delta at a time.

    A block is finished when nothing typed later can change how it renders: a paragraph at its
    blank line, a heading at the end of its line, a fenced code block at its closing fence (blank
    lines inside it never split it; one indented 4 neither opens nor closes one), an indented code block at the first line
    indented less, a thematic break or setext heading at its line, a list only when the first line after it starts something
    that is not part of the list (a line of an item's fenced code indented less than the item's
    text ends both, as in CommonMark). Blocks keep their newlines; what was fed is the blocks, in
    order, then `tail`. Each line is looked at once, when it ends: splitting the whole tail again
    on every token took time quadratic in a long block (a 30,000-token list or code block).
    """

    def __init__(self) -> None:
        self._lines: list[str] = []  # the tail's finished lines
        self._partial: list[str] = []  # pieces of its unfinished last line
        self._head = ""  # the first _HEAD_CHARS characters of that line
        self.chars = 0  # the length of the tail
        self._blank_lines = True  # the tail's finished lines hold only whitespace
        self._blank_partial = True
        self._has_content = self._is_list = self._blank_after_list = False
        self._fence: tuple[str, int, bool] | None = None  # (char, length, is the whole block)
        self._fence_line = ""  # the line that opened it
        self._after_item_fence = False  # the line before closed a list item's fence
        self._fence_item_indent = 0  # a list item's fence: a line indented less than its item's text ends both
        self._items: list[int] = []  # where the text of the list's open items starts, outermost first
        self._indented_code = False  # the tail is an indented code block (blank lines inside never split it)
        self._table_head: int | None = None  # where in _lines a table's header row is (its delimiter row next)
        self._quoted = False  # a line of the tail starts a block quote

    @property
    def blank(self) -> bool:
        """The tail holds only whitespace."""
        return self._blank_lines and self._blank_partial

    @property
    def tail(self) -> str:
        return "".join(self._lines) + self._partial_text()

    def feed(self, delta: str) -> list[str]:
        """The blocks `delta` finished."""
        blocks: list[str] = []
        start = 0
        while (newline := delta.find("\n", start)) >= 0:
            line = self._partial_text() + delta[start : newline + 1]
            self._partial, self._head, self._blank_partial = [], "", True
            self.chars += newline + 1 - start
            self._take_line(line, blocks)
            start = newline + 1
        rest = delta[start:]
        if rest:
            self._partial.append(rest)
            self._head = (self._head + rest[:_HEAD_CHARS])[:_HEAD_CHARS]
            self._blank_partial = self._blank_partial and not rest.strip()
            self.chars += len(rest)
        if self._fence is None and self._is_list and self._blank_after_list and _partial_ends_list(self._head):
            self._cut(blocks)
        return blocks

    def take_tail(self) -> str:
        """The tail, which is then empty (the answer has ended)."""
        tail = self.tail
        self.__init__()  # type: ignore[misc]  # all state back to the start
        return tail

    @property
    def lines(self) -> int:
        """The tail's finished lines."""
        return len(self._lines)

    def preview(self, max_chars: int, max_lines: int) -> str:
        """The end of the tail, at most `max_chars` long and `max_lines` finished lines (with the
        line that opened a code block it ends in, the header and delimiter rows of a table it ends
        in): enough to show its last rows. It starts at the
        first line start (or space, in one long line) past points that move by half of either
        bound at a time, so the rows shown are not wrapped differently on every frame."""
        step = max(max_chars // 2, 1)
        start = -(-(self.chars - max_chars) // step) * step  # rounded up: what is kept fits
        line_step = max(max_lines // 2, 1)
        first_line = -(-(len(self._lines) - max_lines) // line_step) * line_step
        partial = self._partial_text()
        at = self.chars - len(partial)  # where the partial line starts in the tail
        if at < start:
            space = partial.find(" ", start - at)
            kept = [partial[space + 1 if space >= 0 and space - (start - at) < step else start - at :]]
        else:
            kept = [partial]
            for index in range(len(self._lines) - 1, max(first_line, 0) - 1, -1):
                at -= len(self._lines[index])
                if at < start:
                    break
                kept.append(self._lines[index])
        if self._fence is not None and len(kept) <= len(self._lines):  # the opening line was left out
            kept.append(self._fence_line)
        first_kept = len(self._lines) - (len(kept) - 1)  # kept[0] is (the end of) the partial line
        if self._table_head is not None and first_kept > self._table_head:
            # a table's last rows without its header and delimiter rows are a paragraph of raw text
            kept += reversed(self._lines[self._table_head : min(self._table_head + 2, first_kept)])
        return "".join(reversed(kept))

    def _partial_text(self) -> str:
        if len(self._partial) > 1:
            self._partial = ["".join(self._partial)]
        return self._partial[0] if self._partial else ""

    def _cut(self, blocks: list[str]) -> None:
        """The tail's finished lines are a block (if they hold one)."""
        if self._lines and self._has_content:
            block = "".join(self._lines)
            blocks.append(block)
            self._lines, self._blank_lines = [], True
            self.chars -= len(block)
        self._has_content = self._is_list = self._blank_after_list = self._indented_code = False
        self._table_head = None
        self._quoted = False
        self._items = []

    def _add(self, line: str, content: str) -> None:
        self._lines.append(line)
        self._blank_lines = self._blank_lines and not content.strip()
        self._quoted = self._quoted or _BLOCK_QUOTE.match(content) is not None

    def _take_line(self, line: str, blocks: list[str]) -> None:
        content = line.rstrip("\n").rstrip("\r")
        item_fence_ended, after_item_fence = False, self._after_item_fence
        self._after_item_fence = False
        if self._fence is not None:
            char, length, whole_block = self._fence
            stripped = content.strip(" \t")
            if stripped and _indent(content) < self._fence_item_indent:
                self._fence = None  # the item ends, its code block with it; the line starts what it starts
                item_fence_ended = True
            else:
                self._add(line, content)
                indented = whole_block and _indent(content) >= _CODE_INDENT  # code, not a closing fence
                if stripped.startswith(char * length) and not stripped.strip(char) and not indented:
                    self._fence = None
                    self._after_item_fence = self._fence_item_indent > 0  # (one it is sure is an item's)
                    if whole_block:
                        self._has_content = True
                        self._cut(blocks)
                return
        if self._indented_code:
            if not content.strip(" \t") or _indent(content) >= _CODE_INDENT:
                self._add(line, content)  # a blank line, or more code: the block goes on
                return
            self._cut(blocks)  # a line indented less ends it (then starts whatever it starts)
        if not content.strip(" \t"):
            if self._has_content and not self._is_list:
                self._add(line, content)
                self._cut(blocks)
                return
            if self._is_list:
                self._blank_after_list = True
            self._add(line, content)
            return

        indent = _indent(content)
        if indent >= _CODE_INDENT and self._table_head is not None and not self._is_list and not self._quoted:
            self._cut(blocks)  # a line indented 4 ends a table (and starts a code block)
        if indent >= _CODE_INDENT and not self._has_content and not self._is_list:
            self._indented_code = self._has_content = True  # code, even where it looks like a fence or heading
            self._add(line, content)
            return
        item = _LIST_ITEM.match(content) is not None
        paragraph_before = not self._is_list and self._table_head is None and not self._quoted and bool(self._lines)
        if paragraph_before:  # a line of text is last (not a setext underline: a `---` kept for a table)
            last = self._lines[-1].rstrip("\n").rstrip("\r")
            paragraph_before = bool(last.strip()) and not _SETEXT_UNDERLINE.match(last)
        if item and paragraph_before:
            item = _interrupts_paragraph(content)  # else the paragraph's text (a setext heading's, under ---)
        opener = _FENCE_OPEN.match(content) if self._is_list or indent < _CODE_INDENT else None  # else a paragraph's text
        starts_block = opener is not None or _HEADING.match(content) is not None
        starts_block = starts_block or _THEMATIC_BREAK.match(content) is not None
        if self._is_list:
            if self._blank_after_list and not item and indent < _LIST_CONTINUATION_INDENT:
                self._cut(blocks)
            elif not self._blank_after_list and starts_block and indent < _LIST_CONTINUATION_INDENT:
                self._cut(blocks)  # a fence or heading at the margin ends the list (else: lazy continuation)
            elif item_fence_ended and not item and indent < self._items[0]:
                self._cut(blocks)  # no paragraph of the list is open to take it as lazy text: the list ended
            elif after_item_fence and not item and indent < _LIST_CONTINUATION_INDENT:
                self._cut(blocks)  # the same under an item's code block (a `---` next is its setext underline)
            else:
                self._blank_after_list = False

        if opener is not None:
            if not self._is_list:
                self._cut(blocks)  # the paragraph before the fence is finished
            self._fence = (opener.group(2)[0], len(opener.group(2)), not self._is_list)
            self._fence_line = line
            # the innermost open item the fence is in (none: it is past the list, which it ends)
            self._fence_item_indent = next((at for at in reversed(self._items) if at <= indent), 0)
            if indent - self._fence_item_indent >= _CODE_INDENT:
                self._fence_item_indent = 0  # an item's text or code, not its fence: left open as before
            self._has_content = True
            self._add(line, content)
        elif _HEADING.match(content) and not self._is_list:
            self._cut(blocks)
            self._has_content = True
            self._add(line, content)
            self._cut(blocks)
        else:
            if not self._is_list and not item and self._table_head is None and self._starts_table(content):
                self._table_head = len(self._lines) - 1
            ends = not self._is_list and not item and self._table_head is None and self._ends_block(content)
            self._is_list = self._is_list or item
            # it ends the open items whose text is indented more (some such line is their lazy text:
            # an item left out here only keeps the fences in it from ending early)
            while self._items and self._items[-1] > indent:
                self._items.pop()
            if item or (self._items and indent - self._items[-1] < _CODE_INDENT and _NESTED_ITEM.match(content)):
                self._items.append(_content_indent(content))  # an item, or one nested in the last open one
            self._has_content = True
            self._add(line, content)
            if ends:  # nothing after it joins it: a line indented 4 next starts a code block
                self._cut(blocks)

    def _ends_block(self, content: str) -> bool:
        """This line, outside a list or table, finishes its block: a thematic break, or a setext
        heading's `===` under a paragraph (not a block quote's, which is its lazy text). Not `---`
        under a row of pipes: a table's delimiter row."""
        if self._has_content and "|" in self._lines[-1] and "-" in content and _SETEXT_UNDERLINE.match(content):
            return False
        if _THEMATIC_BREAK.match(content):
            return True
        return self._has_content and not self._quoted and "=" in content and _SETEXT_UNDERLINE.match(content) is not None

    def _starts_table(self, delimiter: str) -> bool:
        """This line is a table's delimiter row under the header row before it (same cell count)."""
        if not self._lines or not _TABLE_DELIMITER.match(delimiter) or "|" not in delimiter:
            return False
        header = self._lines[-1].rstrip("\n").rstrip("\r")
        if "|" not in header or not header.strip(" \t") or _indent(header) >= 4:
            return False
        return _cell_count(header) == _cell_count(delimiter)
