"""Fitting text to the terminal: `wrap_text` breaks lines at spaces (a number and its unit kept
together), `format_columns` lays label/value rows out in two columns that fit, `one_line_excerpt`
shortens a message to one line, `counted` says a count with its noun."""

from __future__ import annotations

import re

from rich.cells import cell_len

from ..files import shortened, visible

# A unit stays on the line of the number before it ("30 %", "0.41 s", "1.2 GiB").
_UNITS = frozenset({"%", "s", "ms", "KiB", "MiB", "GiB", "tok", "tok/s", "token", "tokens", "tiles", "frames"})


def _words(line: str) -> list[tuple[str, str]]:
    """(word, the spaces after it); a unit is glued to the number before it."""
    words: list[tuple[str, str]] = []
    for match in re.finditer(r"(\S+)( *)", line):
        word, space = match.groups()
        if words and word.rstrip(".,;:)") in _UNITS and words[-1][0][-1:].isdigit() and words[-1][1] == " ":
            words[-1] = (words[-1][0] + " " + word, space)
        else:
            words.append((word, space))
    return words


def _cut(word: str, first: int, rest: int) -> list[str]:
    """A word wider than the line (a long path) in pieces: the first fits `first` cells, the others `rest`."""
    pieces, current, room = [], "", max(first, 1)
    for ch in word:
        if current and cell_len(current + ch) > room:
            pieces.append(current)
            current, room = "", max(rest, 1)
        current += ch
    return pieces + [current]


def wrap_text(text: str, width: int | None, indent: str | None = None) -> str:
    """`text` with each line broken at spaces to fit `width` cells (None: unchanged).

    Continuation lines get `indent` (default: the line's own indentation plus two spaces). Numbers
    and their units are never split; only a word longer than the line (a path) is cut.
    """
    if width is None:
        return text
    out: list[str] = []
    for line in text.split("\n"):
        if cell_len(line) <= width:
            out.append(line)
            continue
        lead = line[: len(line) - len(line.lstrip(" "))]
        more = indent if indent is not None else lead + "  "
        if cell_len(more) > width // 2:
            more = ""
        current, space = lead, ""
        for word, after in _words(line):
            if current.strip() and cell_len(current) + len(space) + cell_len(word) <= width:
                current += space + word
                space = after
                continue
            if current.strip():
                out.append(current)
                current = more
            room = width - cell_len(current)
            pieces = _cut(word, room, width - cell_len(more)) if cell_len(word) > room else [word]
            for piece in pieces[:-1]:
                out.append(current + piece)
                current = more
            current += pieces[-1]
            space = after
        out.append(current)
    return "\n".join(out)


def pad_cells(text: str, width: int) -> str:
    """`text` padded with spaces to `width` terminal cells (str.ljust counts characters: a CJK name,
    two cells a character, ran past its column)."""
    return text + " " * max(width - cell_len(text), 0)


def format_columns(rows: list[tuple[str, str]], width: int | None, *, indent: int = 0, gap: int = 2,
                   align_right: bool = False) -> str:  # fmt: skip
    """Label/value rows in two columns that fit `width`: long labels wrap in their column (or a
    value too wide for its column goes on its own line below the label, indented)."""
    if not rows:
        return ""
    pad = " " * indent
    label_width = max(cell_len(label) for label, _ in rows)
    value_width = max(cell_len(value) for _, value in rows)
    if width is not None:
        label_width = min(label_width, width - indent - gap - value_width)
    if width is None or label_width >= 12:
        lines = []
        for label, value in rows:
            label_lines = wrap_text(label, label_width, indent="  ").split("\n") if width is not None else [label]
            cell = value.rjust(value_width) if align_right else value
            first = label_lines[0] + " " * (label_width - cell_len(label_lines[0]))  # wide characters: two cells
            lines.append(f"{pad}{first}{' ' * gap}{cell}".rstrip())
            lines += [pad + extra for extra in label_lines[1:]]
        return "\n".join(lines)
    lines = []
    for label, value in rows:  # too narrow for two columns: the value under its label
        lines.append(wrap_text(pad + label, width))
        lines.append(wrap_text(pad + "    " + value, width))
    return "\n".join(lines)


def one_line_excerpt(text: str, width: int = 48) -> str:
    """A one-line excerpt of a message (it may come from a session file: shown inert)."""
    one_line = visible(" ".join(text.split()))
    return shortened(one_line, width)
