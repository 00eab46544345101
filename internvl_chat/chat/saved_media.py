"""A saved session's media found again for /load: each file looked for where the session file
says it was (session_file.media_candidates), checked by size and sha256, and measured again; what
vanished or changed is one error, or with --skip-missing left out of its turn, a note in its text.

Session and RemoteConversation both restore through it (each with its own measuring), so a session
file loads the same way whichever conversation reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MediaError
from ..files import open_regular_file, visible
from .session_file import SavedMedia, SavedSession, media_candidates

if TYPE_CHECKING:  # session.py imports this module: no import cycle at run time
    from .session import Media


def sha256_of(path: Path) -> str:
    """The file's sha256; NotRegularFile (an OSError) for a FIFO or a device, even one swapped in
    after a check: reading it would wait for a writer forever, or never end."""
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ReadiedSession:
    """A validated session file with its media found and measured, ready for `restore` (the turns
    are the reading conversation's own kind: `Turn` in chat/session.py, `RemoteTurn` in chat/remote.py)."""

    saved: SavedSession
    turns: list
    left_out: list[LeftOut] = field(default_factory=list)  # media a load without missing ones left out
    ids: list[int] | None = None  # the conversation's token ids as read_saved counted them (local): not tokenized again


# the opt-in that loads a session without the media files that vanished or changed (/load's flag)
SKIP_MISSING_FLAG = "--skip-missing"


@dataclass(frozen=True)
class LeftOut:
    """A saved media file that a load without missing media left out of its turn."""

    turn: int  # 1-based
    kind: str  # "image" or "video"
    name: str  # the file's name, escaped for a terminal and for the session file (`visible`)
    found: bool  # a file stands there, but it changed (or cannot be read as it was)

    @property
    def note(self) -> str:
        """What the turn's text says in the file's place, so the model reads that something was there."""
        return f"[{self.kind} {self.name} {'has changed' if self.found else 'was not found'}]"


def with_notes(text: str, left_out: Sequence[LeftOut]) -> str:
    """A turn's text with a note for each left-out file before it, where the template puts media."""
    return "\n".join([*(m.note for m in left_out), *([text] if text or not left_out else [])])


def saved_media(saved: SavedSession, describe_image, describe_video,
                skip_missing: bool = False) -> tuple[list[list[Media]], list[LeftOut]]:  # fmt: skip
    """Each saved turn's media found (see `media_candidates`), checked by sha256 and measured again
    (`describe_image(path, max_tiles)`, `describe_video(path, frames, range)`); one MediaError
    naming what vanished or changed, or with `skip_missing` those left out of their turns (and
    listed as `LeftOut`, in turn order)."""
    out: list[list[Media]] = []
    problems: list[str] = []
    left_out: list[LeftOut] = []
    digests: dict[tuple[int, ...], str] = {}  # a file every turn shows (a long video) is read once
    measured: dict[tuple, Media | str] = {}  # … and measured once (a long MKV's frames are counted by demuxing)
    for number, saved_turn in enumerate(saved.turns, start=1):
        media = []
        for m in saved_turn.media:
            item, problem = _media_from_saved(m, saved.path, describe_image, describe_video, digests, measured)
            if problem:
                problems.append(problem)
                found = any(_is_regular_file(p) for p in media_candidates(m, saved.path))
                left_out.append(LeftOut(number, m.kind, visible(Path(m.path).name), found))
            else:
                media.append(item)
        out.append(media)
    if problems and not skip_missing:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise MediaError(f"cannot restore the session: {shown}; put the files back, add {SKIP_MISSING_FLAG} to "
                         "/load to load it without them, or start anew")  # fmt: skip
    return out, left_out


def _media_from_saved(
    m: SavedMedia, session_file: Path, describe_image, describe_video, digests: dict[tuple[int, ...], str],
    measured: dict[tuple, Media | str],
) -> tuple[Media | None, str | None]:
    candidates = media_candidates(m, session_file)
    existing = [p for p in candidates if _is_regular_file(p)]
    shown = visible(m.path)
    if not existing:
        other = next((p for p in candidates if os.path.lexists(p)), None)
        if other is not None:  # a folder, a pipe, a device or a symlink loop now stands there
            return None, f"{visible(str(other))} is not a regular file"
        return None, f"{shown} has vanished"
    # a file of another size has changed: it is not read through (a large video, or any file a
    # hand-made session names) to learn that
    same_size = [p for p in existing if not m.size_bytes or _size(p) == m.size_bytes]
    path = None
    for candidate in same_size:
        try:
            if not m.sha256 or _known_sha256(candidate, digests) == m.sha256:
                path = candidate
                break
        except OSError as e:  # unreadable now (its permissions): a problem of this file, which --skip-missing leaves out
            return None, f"{visible(str(candidate))} cannot be read ({visible(e.strerror or str(e))})"
    if path is None:
        return None, f"{visible(str(existing[0]))} has changed since the session was saved"
    # one measurement per file version and way of measuring it; each turn gets a Media of its own
    try:
        key = (_version(path), m.kind, m.max_tiles if m.kind == "image" else (m.frames, m.video_range))
    except OSError as e:  # gone since it was hashed
        return None, f"{visible(str(path))} cannot be read ({visible(e.strerror or str(e))})"
    if key not in measured:
        try:
            if m.kind == "image":
                measured[key] = describe_image(path, m.max_tiles)
            else:
                measured[key] = describe_video(path, m.frames, m.video_range)
        except MediaError as e:
            measured[key] = str(e)
    found = measured[key]
    if isinstance(found, str):
        return None, found
    media = dataclasses.replace(found, path=path)  # the same file may be named another way
    if media.tiles != m.tiles:
        return None, f"{visible(str(path))} now gives {media.tiles} tiles instead of {m.tiles}"
    media.sha256 = m.sha256
    return media, None


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _version(path: Path) -> tuple[int, ...]:
    """A file and its version: (device, inode, size, mtime)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _known_sha256(path: Path, digests: dict[tuple[int, ...], str]) -> str:
    """sha256_of(path), read once per file and version (device, inode, size, mtime) in `digests`."""
    key = _version(path)
    if key not in digests:
        digests[key] = sha256_of(path)
    return digests[key]


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False
