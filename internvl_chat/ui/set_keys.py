"""Which settings `/set` can change while the app runs, and what it says about the others.

A suggestion for a mistyped key names only keys `/set` can change; a key read once at start
(typed in full, by its bare name, or nearly) gets a line saying so, with how to change it.
"""

from __future__ import annotations

import difflib

from ..errors import UsageError
from ..files import brief_repr
from ..settings import SECTIONS, SET_ALIASES, all_keys, env_name, resolve_key
from .chat_flags import chat_setting_flags

# Settings read once at start: /set refuses them (and Tab does not offer them). Whole sections too:
# the model, the server this app talks to, and `internvl-chat serve`'s own settings.
FIXED_AT_START = ("ui.color", "ui.history", "ui.history_file")
FIXED_SECTIONS = ("model.", "remote.", "serve.")


def changeable_while_running(dotted: str) -> bool:
    """Whether `/set` can change this setting: not the model's or the server's, nor those read once at start."""
    return not dotted.startswith(FIXED_SECTIONS) and dotted not in FIXED_AT_START


# The chat's flag for each setting read at start that has one, as typed ("--dtype T", "--no-history"),
# from its parser; the others come from the config file or the environment only.
START_FLAGS = {flag.setting: flag.usage for flag in chat_setting_flags() if not changeable_while_running(flag.setting)}
# of those, the switches, with the value each gives: `--no-history` turns ui.history off, never on
START_SWITCHES = {flag.setting: flag.switch_value for flag in chat_setting_flags()
                  if flag.is_switch and not changeable_while_running(flag.setting)}  # fmt: skip


def runtime_keys() -> list[str]:
    """The dotted keys `/set` can change."""
    return [key for key in all_keys() if changeable_while_running(key)]


def read_at_start(dotted: str, server: str = "") -> str:
    """Why `/set` cannot change `dotted` and how to change it, as one line.

    `server`: the server this chat talks to, if any (the model.* settings then do not apply)."""
    if dotted.startswith("serve."):
        return f"{dotted} is read by internvl-chat serve when it starts; this chat does not use it"
    if dotted.startswith("model.") and server:
        return f"{dotted} is for a local model; the answers here come from the server"
    flag = START_FLAGS.get(dotted)
    section, name = dotted.split(".")
    in_file = f"set {name} in the config file's [{section}] or {env_name(dotted)}, then restart"
    if dotted in START_SWITCHES:  # "/set ui.history true" was told to restart with --no-history
        return f"{dotted} is read at start; restart with {flag} to turn it {'on' if START_SWITCHES[dotted] else 'off'}, or {in_file}"
    if flag:
        return f"{dotted} is read at start; restart with {flag}"
    return f"{dotted} is read at start; {in_file}"


def _bare_names() -> dict[str, str]:
    """Bare names of the chat's settings read at start ("max_context" -> "model.max_context"), where
    the name is one setting's only and no section's."""
    keys = [key for key in all_keys() if not changeable_while_running(key) and not key.startswith("serve.")]
    names = [key.split(".")[1] for key in keys]
    return {name: key for name, key in zip(names, keys) if names.count(name) == 1 and name not in SECTIONS}


def set_key(key: str, server: str = "") -> str:
    """The dotted key `/set KEY` names: an alias or any dotted key (one read at start can be shown).

    Any other word is a UsageError: for the bare or nearly typed name of a setting read at start,
    the `read_at_start` line; else the closest key `/set` can change, if one is close.
    """
    try:
        return resolve_key(key)
    except UsageError:
        pass
    word = key.strip().lower().replace("-", "_")
    bare = _bare_names()
    if word in bare:
        raise UsageError(read_at_start(bare[word], server))
    meaning = {**{key: key for key in all_keys()}, **bare, **SET_ALIASES}
    close = difflib.get_close_matches(word, list(meaning), n=1, cutoff=0.5)
    if close and not changeable_while_running(meaning[close[0]]) and not _nearly(word, close[0]):
        # loosely alike only (`nope` and `compile`, `foo` and `color`): naming that setting as the
        # one read at start told the user about a setting they never meant; suggest a key /set can change
        changeable = [name for name, dotted in meaning.items() if changeable_while_running(dotted)]
        close = difflib.get_close_matches(word, changeable, n=1, cutoff=0.5)
    if not close:
        raise UsageError(f"unknown setting {brief_repr(key)}; /set alone lists the settings it can change")
    dotted = meaning[close[0]]
    if not changeable_while_running(dotted):
        raise UsageError(f"unknown setting {brief_repr(key)}; {read_at_start(dotted, server)}")
    raise UsageError(f"unknown setting {brief_repr(key)} (did you mean {close[0]!r}?); /set alone lists the settings it can change")


def _nearly(word: str, key: str) -> bool:
    """A typo of `key` (a letter or two wrong), not a different word that shares a few letters."""
    return difflib.SequenceMatcher(None, word, key).ratio() >= 0.8
