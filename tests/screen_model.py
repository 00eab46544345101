"""Screen models for the terminal tests: pyte's VT100 screen, and one that reflows on resize.

pyte, like xterm, keeps each row as it is when the window changes width (cut off when narrower).
Most terminals people use (VTE/GNOME Terminal, iTerm2, Terminal.app, kitty, Windows Terminal,
tmux) instead re-wrap their lines: a row that was soft-wrapped joins the next one, a row longer
than the new width wraps, and the cursor moves with its line. `ReflowScreen` adds that to pyte,
so a test can check that output redrawn in place stays right in both kinds of terminal.
"""

from __future__ import annotations

import pyte
from pyte import modes as mo


def _row_length(row, columns: int) -> int:
    return getattr(row, "length", 0) if not getattr(row, "wrapped", False) else columns


class ReflowScreen(pyte.Screen):
    """A pyte screen that remembers soft wraps and written lengths, and re-wraps on resize."""

    def draw(self, data: str) -> None:
        for char in data:
            if self.cursor.x >= self.columns and mo.DECAWM in self.mode:
                self.buffer[self.cursor.y].wrapped = True  # autowrap: the line goes on below
            super().draw(char)
            row = self.buffer[self.cursor.y]
            row.length = max(getattr(row, "length", 0), min(self.cursor.x, self.columns))

    def erase_in_line(self, how: int = 0, private: bool = False) -> None:
        super().erase_in_line(how, private)
        row = self.buffer[self.cursor.y]
        if how in (0, 2):
            row.wrapped = False
            row.length = 0 if how == 2 else min(getattr(row, "length", 0), self.cursor.x)

    def erase_in_display(self, how: int = 0, *args, **kwargs) -> None:
        super().erase_in_display(how, *args, **kwargs)
        rows = range(self.cursor.y + 1, self.lines) if how == 0 else range(0, self.lines) if how in (2, 3) else ()
        for y in rows:
            self.buffer[y].wrapped = False
            self.buffer[y].length = 0
        if how == 0:
            row = self.buffer[self.cursor.y]
            row.wrapped = False
            row.length = min(getattr(row, "length", 0), self.cursor.x)

    def resize(self, lines: int | None = None, columns: int | None = None) -> None:
        columns = columns or self.columns
        lines = lines or self.lines
        if columns == self.columns:
            super().resize(lines, columns)
            return
        # logical lines: rows joined across soft wraps; the cursor as (line, offset)
        logical: list[list] = []
        cursor_at = (0, 0)
        current: list = []
        for y in range(self.lines):
            row = self.buffer[y]
            length = _row_length(row, self.columns)
            if y == self.cursor.y:
                cursor_at = (len(logical), len(current) + self.cursor.x)
            current += [row[x] for x in range(length)]
            if not getattr(row, "wrapped", False):
                logical.append(current)
                current = []
        if current:
            logical.append(current)
        while len(logical) > cursor_at[0] + 1 and not logical[-1]:
            logical.pop()  # empty lines below the cursor are not content
        rows: list[tuple[list, bool]] = []
        cursor = (0, 0)
        for n, cells in enumerate(logical):
            chunks = [cells[i : i + columns] for i in range(0, len(cells), columns)] or [[]]
            if n == cursor_at[0]:
                offset = cursor_at[1]
                extra = offset // columns
                while len(chunks) <= extra:
                    chunks.append([])
                cursor = (len(rows) + extra, offset % columns)
            rows += [(chunk, i < len(chunks) - 1) for i, chunk in enumerate(chunks)]
        drop = max(0, len(rows) - lines, cursor[0] - lines + 1)
        rows = rows[drop:]
        super().resize(lines, columns)
        self.buffer.clear()
        for y, (cells, wrapped) in enumerate(rows):
            row = self.buffer[y]
            for x, char in enumerate(cells):
                row[x] = char
            row.wrapped, row.length = wrapped, len(cells)
        self.cursor.y, self.cursor.x = cursor[0] - drop, cursor[1]
        self.dirty.update(range(lines))


def make_screen(columns: int, lines: int, reflow: bool) -> pyte.Screen:
    return ReflowScreen(columns, lines) if reflow else pyte.Screen(columns, lines)
