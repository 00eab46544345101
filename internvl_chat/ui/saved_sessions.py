"""The saved sessions folder: where `/save` writes by default, the session files listed there (for
`/load` alone and its Tab completion), what a session file holds at a glance (and whether `/load`
takes it), and which saved settings `/load` restores."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

from ..chat.session_file import SESSION_FORMAT, SESSION_VERSION, DamagedSession, parse_session
from ..errors import InternVLChatError
from ..files import brief_repr, read_text_file, xdg_dir
from ..numbers import counted


def default_sessions_dir(env: dict[str, str] | os._Environ = os.environ) -> Path:
    return xdg_dir(env, "XDG_STATE_HOME", ".local/state") / "internvl-chat" / "sessions"


# What /load restores from the settings saved with a session (model and UI settings stay as run).
RESTORED_SETTINGS = (
    "generation.temperature", "generation.top_p", "generation.top_k", "generation.repetition_penalty",
    "generation.max_new_tokens", "generation.seed", "media.max_tiles", "media.frames",
)  # fmt: skip


def recent_sessions(folder: Path) -> list[tuple[Path, float]]:
    """The session files (*.json) in `folder`, newest first, with their modification times."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            info = entry.stat()  # follows a symlink: what /load would read
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((Path(entry.path), info.st_mtime))
    return sorted(found, key=lambda item: item[1], reverse=True)


def file_date(mtime: float) -> str:
    """A file's modification time as `2026-12-02 13:37`, or `?` for one no calendar date holds (an
    archive keeps any time, and tmpfs, btrfs or XFS store years past 9999)."""
    try:
        return f"{datetime.fromtimestamp(mtime):%Y-%m-%d %H:%M}"
    except (ValueError, OverflowError, OSError):
        return "?"


def saved_messages(path: Path) -> list[tuple[Any, Any, Any]] | None:
    """(role, text, media) of each message in a session file, or None when it is not one; the media
    as `message_media` gives them (the same texts asked of other pictures are another conversation)."""
    try:
        data = json.loads(read_text_file(path, "session file"))
    except (InternVLChatError, ValueError, RecursionError):
        return None
    messages = data.get("messages") if isinstance(data, dict) and data.get("format") == SESSION_FORMAT else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return [(m.get("role"), m.get("text"), message_media(m)) for m in messages]


def message_media(message: dict) -> Any:
    """What the model saw of a message's media in a session file: (kind, sha256, tiles, range) of
    each item, or the value as it is where it is no list of objects (it then matches no
    conversation's). Not the path: a folder moved with its pictures, or a file named by a link,
    is the same picture at another path."""
    media = message.get("media", [])
    if not isinstance(media, list) or not all(isinstance(m, dict) for m in media):
        return media
    return [(m.get("kind"), m.get("sha256"), m.get("tiles"), m.get("range")) for m in media]


def session_at_a_glance(path: Path) -> tuple[str, str]:
    """What `/load` alone lists for a session file: ("3 turns", ""), or ("cannot load", why in a
    few words) for one /load would refuse (the list counted the turns of a version-2 file, or of
    one ending with a question and no answer, and offered them)."""
    try:
        data = json.loads(read_text_file(path, "session file"))
    except (InternVLChatError, ValueError, RecursionError):
        return "cannot load", "not readable"
    try:  # the checks /load makes, but for the vocabulary (the model's) and the media files (loading's)
        return counted(len(parse_session(data, path, None, ()).turns), "turn"), ""
    except DamagedSession:
        pass
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        return "cannot load", "not a session"
    version = data.get("version")
    if type(version) is not int or version != SESSION_VERSION:
        return "cannot load", f"format version {brief_repr(version, 12)}, this build reads {SESSION_VERSION}"
    return "cannot load", "damaged"
