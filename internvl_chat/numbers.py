"""Numbers that people type in commands, flags, settings and the environment: the digits 0-9, a sign,
and for floats a point and an exponent; spaces around them dropped. int() and float() read more:
`١` as 1, `1_0` as 10 (`/drop 1_0` dropped item 10), `inf` and `nan`. Other digits are `OtherDigits`,
which says so with the text escaped; anything else a plain ValueError, which callers may word their own way.
And the other way: `counted`, a count said with its noun."""

from __future__ import annotations

import argparse
import re
import string

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class OtherDigits(ValueError, argparse.ArgumentTypeError):
    """A number written with digits other than 0-9; str() is the refusal, the text escaped (argparse
    shows it as it is, where it words a plain ValueError "invalid int value: 'x'")."""

    def __init__(self, text: str):
        super().__init__(f"must be written with the digits 0-9, not {ascii_shown(text)}")


def ascii_shown(text: str, width: int = 40) -> str:
    """`text` quoted and escaped as ascii() writes it ('\\u0661'), cut short."""
    shown = ascii(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def other_digits(text: str) -> OtherDigits | None:
    """The refusal of `text` when it holds a digit other than 0-9 (Arabic-Indic ١, Devanagari १,
    fullwidth ２, 𝟏 …); also for text a pattern of [0-9] reads (a time range, a device), to say why."""
    return OtherDigits(text) if any(c.isdigit() and not c.isascii() for c in text) else None


def _read(text: str, pattern: re.Pattern[str], convert, what: str):
    if refused := other_digits(text):
        raise refused
    try:
        if pattern.fullmatch(text.strip(string.whitespace)):
            return convert(text)
    except ValueError:  # int() refuses more than 4,300 digits, in words about sys.set_int_max_str_digits
        pass
    raise ValueError(f"must be {what}, not {ascii_shown(text)}")


def parse_int(text: str) -> int:
    """A whole number as a user writes it (`12`, `-3`); ValueError for any other text."""
    return _read(text, _INT, int, "a whole number")


def parse_float(text: str) -> float:
    """A number as a user writes it (`0.5`, `-2`, `1e-3`), never inf or nan, though `1e999` is inf, for the
    caller's range check to refuse."""
    return _read(text, _FLOAT, float, "a number")


def counted(count: int, noun: str) -> str:
    """`1 turn`, `2 turns`, `1,024 tokens`: the noun singular for one (never `1 turn(s)`)."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")
