"""Settings as the app shows them: `/set` alone (the table of what it can change), `/set KEY`,
`/show` (the sections that apply to this chat) and `/load`'s note. A value is written as the
config file writes it and made safe to print (a key masked, text from a file or the model
escaped), with where it came from."""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len

from ..files import shortened, visible
from ..settings import SECTIONS, Settings, shown_value, toml_value
from .set_keys import runtime_keys

LISTED_VALUE_WIDTH = 40  # `/set` alone lists values up to this long, longer ones cut short
# Settings sections that apply to no chat, or not to this one, and whose they are (/show leaves them out)
NOT_THIS_CHATS = {"serve": "internvl-chat serve's", "model": "for a local model", "remote": "for --server"}


def plain_value(value: Any) -> str:
    """A setting as the config file writes it: true/false, unset for none."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def setting_source(settings: Settings, dotted: str) -> str:
    """Where a value came from: default, flag, /set, env NAME, config PATH (a path: shown inert)."""
    return visible(settings.sources.get(dotted, "default"))


def setting_text(settings: Settings, dotted: str, system_message: str | None, width: int | None = None) -> str:
    """A value as the config file writes it (`false`, `"text"`), made safe to print (a key masked);
    with `width`, one longer than that is cut short with … `system_message`: the one in use (an
    unset system.message means the model's default)."""
    value = shown_value(dotted, settings.get(dotted))
    if value is None and dotted == "system.message":
        return unset_system(settings, system_message, width)
    text = "(not set)" if value is None else visible(toml_value(value))
    if value == "" and dotted == "system.message":  # `""` alone read as a message of two quotes
        text += " (none is sent, the server decides)" if settings.remote.server else " (none: no system message is sent)"
    return text if width is None else shortened(text, width)


def unset_system(settings: Settings, system_message: str | None, width: int | None = None) -> str:
    """What an unset system.message means here (`/system` shows the message in use): the model's
    default, quoted and escaped (only … when that is over `width`), none, or what the server decides."""
    if settings.remote.server:
        return "(not set: none is sent, the server decides)"
    if not system_message:
        return "(not set: the model has no default)"
    text = visible(toml_value(system_message))
    if width is not None and len(text) > width:
        text = "…"  # no room left for a useful excerpt beside these words
    return f"(not set: the model's default, {text})"


def settings_table(settings: Settings, system_message: str | None, width: int | None) -> tuple[str, bool]:
    """`/set` alone: each setting it can change, its value and where the value came from, fitted to
    `width` (None: not a terminal); and whether a value was cut short."""
    rows, cut = [], False
    for dotted in runtime_keys():
        value = setting_text(settings, dotted, system_message, LISTED_VALUE_WIDTH)  # a long system message: /set KEY shows it whole
        cut = cut or value != setting_text(settings, dotted, system_message)
        rows.append((dotted, value, f"(from {setting_source(settings, dotted)})"))
    column = max(len(dotted) for dotted, _, _ in rows)
    if width is not None and column + 5 + 24 > width:  # too narrow to align the values
        column = 0
    lines = []
    for dotted, value, source in rows:
        line = f"  {dotted.ljust(column)} = {value}"
        fits = width is None or cell_len(line) + 2 + cell_len(source) <= width
        lines.append(f"{line}  {source}" if fits else f"{line}\n    {source}")  # a source stays whole
    return "\n".join(lines), cut


def chat_sections(settings: Settings) -> tuple[list[str], list[str]]:
    """(the sections that apply to this chat, those that do not): [serve] is the server command's,
    [model] applies to a local model and [remote] to a server, so only one of them is this chat's."""
    left_out = ["serve", "model" if settings.remote.server else "remote"]
    applies = [section for section in SECTIONS if section not in left_out]
    return applies, [section for section in SECTIONS if section in left_out]


def left_out_note(left_out: list[str]) -> str:
    """`/show`'s line saying which sections it left out and where every setting is listed."""
    named = ", ".join(f"[{section}] ({NOT_THIS_CHATS[section]})" for section in left_out)
    return f"not shown, as they do not apply to this chat: {named}; --print-config lists every setting"
