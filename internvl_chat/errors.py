"""The error types every layer raises; each message is one sentence that says what to do.

The CLI maps `exit_code` to the process status: 2 for bad usage or input, 1 for everything else.
Also the refusal every layer gives a number written with digits other than 0-9 (`foreign_digits`).
"""

import argparse


class InternVLChatError(Exception):
    """Base class: a failure the user can act on. `str(err)` is the one-line message."""

    exit_code = 1


class UsageError(InternVLChatError):
    """Bad flags, commands or settings."""

    exit_code = 2


class CheckpointError(InternVLChatError):
    """A model folder that is missing, incomplete, or of a layout we do not support."""

    exit_code = 2


class MediaError(InternVLChatError):
    """An image or video that cannot be read or used."""

    exit_code = 2


class ContextOverflowError(InternVLChatError):
    """A turn that would not fit in the KV cache; the session is left unchanged."""

    exit_code = 2


class GenerationError(InternVLChatError):
    """Generation failed (non-finite logits, out of memory); the session is left consistent."""

    exit_code = 1


class RemoteError(InternVLChatError):
    """A remote server refused, failed or could not be reached; the conversation is left as it was."""

    exit_code = 1


class Cancelled(Exception):
    """Work stopped before an answer began because its caller set the cancel event (a client that
    went away, a server that is stopping); the session is left as it was. Not an
    InternVLChatError: nothing failed."""


def foreign_digits(text: str) -> bool:
    """True when `text` holds a digit other than 0-9 (Arabic-Indic ١, Devanagari १, fullwidth ２, 𝟏 …).
    int(), float() and a pattern's \\d read them as numbers: `/drop ١` dropped item 1 while the line
    showed another script's digit. A number written with them is refused instead."""
    return any(c.isdigit() and not c.isascii() for c in text)


def ascii_shown(text: str, width: int = 40) -> str:
    """`text` quoted and escaped as ascii() writes it ('\\u0661'), cut short."""
    shown = ascii(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def foreign_digits_refused(text: str) -> str:
    """The words that refuse a number written with other digits, the text escaped."""
    return f"must be written with the digits 0-9, not {ascii_shown(text)}"


def _digits_0_to_9(convert):
    """`convert` (int or float) for argparse, refusing other digits with their escape."""

    def parse(text: str):
        if foreign_digits(text):
            raise argparse.ArgumentTypeError(foreign_digits_refused(text))
        return convert(text)

    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UsageError: one line through the CLI's error handling (exit 2),
    shown inert. Its own error printed the whole usage block, and an unknown flag as typed, escape
    sequences and all. A flag of type int or float takes the digits 0-9 only (`--frames ٨` was 8)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for number in (int, float):  # the action's type stays int or float: only its conversion is looked up here
            self.register("type", number, _digits_0_to_9(number))

    def error(self, message: str):
        raise UsageError(f"{message}; see {self.prog} --help")
