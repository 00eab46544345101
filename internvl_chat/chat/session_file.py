"""The session file (`/save`, `/load`): its format, and the validation of a file we did not write.

A session file may have been edited, truncated, written by another version or made to attack
the app, so `parse_session` checks every field before anything else happens: JSON types, token
ids inside the vocabulary and never a media placeholder (those would break the alignment of image
features), media kinds and numbers within the app's own limits, bounded counts. The result is
plain data; the caller re-measures the media and replays the conversation only after that.

Media paths are stored absolute, together with the path relative to the session file's folder,
so a folder holding a session and its pictures can be moved or copied to another machine. A file
name that is not UTF-8 is kept byte for byte: Python holds its bytes as lone surrogates
(U+DC80…U+DCFF), written as `\\udcXX` escapes and accepted back in path fields only.

`backend` says where the answers came from: `{"kind": "local"}` (token ids of each answer saved,
a cancelled answer's text ends with the " [cancelled]" mark) or `{"kind": "remote", "server",
"model", "dialect"}` (answers exactly as the server returned them, no token ids, the server's
`usage` when it sent one). Files without `backend` are local. Either kind loads into either
conversation: `SavedTurn.reply` is the answer without the mark, and `answer_ids` is None when the
file has no ids.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import (IMAGE_KINDS, PRIVATE_FILE_MODE, brief_repr, decode_utf8, escape_hidden, expand_home, file_system_name, is_video_kind,
                     read_bytes_file, refuse_wide_text, sniff_binary, undecodable_byte, visible)
from ..settings import MAX_FRAMES, MAX_RANGE_SECONDS, MAX_TILES
from .dialects import DIALECTS

SESSION_FORMAT = "internvl-chat-session"
SESSION_FILE_MODE = PRIVATE_FILE_MODE  # it holds what was typed and answered
SESSION_VERSION = 1

# Limits of what a session may hold; far above any real conversation (the context caps it first).
MAX_TURNS = 10_000
MAX_MEDIA_PER_TURN = 64
# media.max_tiles and media.frames go up to the settings' MAX_TILES and MAX_FRAMES, and a saved
# video range as far as /video --range accepts (MAX_RANGE_SECONDS), so what was saved loads back
# "error": a server's answer that broke off (the connection, an error event); its text is what came
FINISH_REASONS = ("stop", "length", "cancelled", "error")
CANCELLED_MARK = "[cancelled]"  # a local answer that was cut by Ctrl-C ends with " [cancelled]"
BACKEND_KINDS = ("local", "remote")
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX in bytes (macOS's is 1024): a longer path names no file
MAX_TOKEN_ID = 2**31 - 1  # when no vocabulary is known (a remote conversation reads the ids, never uses them)
MAX_COUNT = 1 << 40  # usage counts
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_A_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # surrogates that os.fsencode cannot turn into a byte


@dataclass(frozen=True)
class SavedMedia:
    kind: str  # "image" or "video"
    path: str  # as saved: absolute since this format writes it so
    relative_path: str | None  # relative to the session file's folder when saved
    tiles: int
    max_tiles: int
    frames: int
    video_range: tuple[float, float] | None
    sha256: str
    size_bytes: int = 0  # the file's size when saved (0: not recorded)
    size: tuple[int, int] | None = None  # an image's (width, height) when saved (None: not recorded)


@dataclass(frozen=True)
class SavedTurn:
    user_text: str
    media: tuple[SavedMedia, ...]
    answer_text: str  # as saved (a local cancelled answer with its mark)
    answer_ids: tuple[int, ...] | None  # None: the file has none (saved from a server's answers)
    finish_reason: str | None
    reply: str = ""  # the answer itself, without the cancelled mark
    usage: dict[str, int] | None = None  # a server's usage, when it sent one


@dataclass(frozen=True)
class SavedSession:
    path: Path
    model: str | None
    system_message: str | None
    settings: dict[str, Any]
    turns: tuple[SavedTurn, ...]
    data: dict[str, Any]  # the JSON as read (validated)
    backend: dict[str, str] | None = None  # {"kind": "local"} or {"kind": "remote", "server", "model", "dialect"}

    @property
    def kind(self) -> str:
        return (self.backend or {}).get("kind", "local")


class DamagedSession(UsageError):
    """A session file that does not hold a valid session; nothing was changed."""


def read_session_file(path: Path, vocab_size: int | None, forbidden_ids: Collection[int]) -> SavedSession:
    """Read and validate a session file; raises a one-line UsageError for anything wrong with it.

    `vocab_size` None: token ids are only checked to be ids (the reader has no vocabulary)."""
    shown = visible(str(path))
    data = read_bytes_file(path, "session file")
    refuse_wide_text(data, f"session file {shown}")  # before the sniff: UTF-16's NUL bytes would read as binary
    _refuse_binary(data, shown)
    text = decode_utf8(data, f"session file {shown}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedSession(f"session file {shown} is not valid JSON ({e.msg} on line {e.lineno}); "
                             "is it a file saved with /save?") from None  # fmt: skip
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, arrays nested 100,000 deep
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else "it holds a number too large"
        raise DamagedSession(f"session file {shown} cannot be read: {reason}; is it a file saved with /save?") from None
    return parse_session(data, path, vocab_size, forbidden_ids)


def _refuse_binary(data: bytes, shown: str) -> None:
    """A picture, video or other binary file given to /load (meant for /image or /video) is named as
    what it is: "not UTF-8 text ...; save it as UTF-8" advised converting a PNG."""
    kind = sniff_binary(data)
    if kind is None:
        return
    if kind in IMAGE_KINDS or is_video_kind(kind):
        fix = f"attach it with /{'image' if kind in IMAGE_KINDS else 'video'}, and /load a file saved with /save"
    else:
        fix = "give a file saved with /save"
    raise DamagedSession(f"session file {shown} is {kind}, not a session; {fix}")


def parse_session(data: Any, path: Path, vocab_size: int | None, forbidden_ids: Collection[int]) -> SavedSession:
    """Validate parsed JSON as a session; every field is checked before any is used."""
    shown = visible(str(path))
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise DamagedSession(f"{shown} is not an internvl-chat session file; give a file saved with /save")
    version = data.get("version")
    if type(version) is not int or version != SESSION_VERSION:
        raise DamagedSession(f"{shown} has session format version {brief_repr(version)}; this build reads version "
                             f"{SESSION_VERSION}, so it was not loaded")  # fmt: skip
    check = _Checker(shown)
    backend = check.backend(data.get("backend", {"kind": "local"}))
    model = None if data.get("model") is None else check.path(data.get("model"), "model")
    system = check.optional_text(data.get("system_message"), "system_message")
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        check.fail("settings", "must be an object of [section] objects", settings)
    messages = data.get("messages", [])
    if not isinstance(messages, list):
        check.fail("messages", "must be a list", messages)
    if len(messages) > 2 * MAX_TURNS:
        check.fail("messages", f"holds {len(messages):,} messages, over the limit of {2 * MAX_TURNS:,}", None)
    if len(messages) % 2:
        check.fail(f"message {len(messages)}", "is a question without its answer", None)
    forbidden = set(forbidden_ids)
    local = backend["kind"] == "local"
    turns = tuple(
        check.turn(messages[i], messages[i + 1], i + 1, vocab_size, forbidden, local) for i in range(0, len(messages), 2)
    )
    return SavedSession(path, model, system, settings, turns, data, backend)


class _Checker:
    """Field checks that name the field in their error: `message 3 (user) media 1: tiles must be …`."""

    def __init__(self, shown: str):
        self.shown = shown

    def fail(self, where: str, problem: str, value: Any) -> None:
        got = "" if value is None else f", not {brief_repr(value)}"
        raise DamagedSession(f"session file {self.shown} is damaged: {where} {problem}{got}; it was not loaded")

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, "must be a text", value)
        if undecodable_byte(value) is not None:
            self.fail(where, "holds a lone surrogate (a \\ud800-\\udfff escape), which is no text", None)
        return value

    def path(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, "must be a text", value)
        if _NOT_A_BYTE.search(value):
            self.fail(where, "holds a lone surrogate that stands for no byte of a file name", None)
        if not value or "\x00" in value:
            self.fail(where, "must be a file path", value)
        if len(value) > MAX_PATH_CHARS:  # no system opens it, and the messages naming it would print it all
            self.fail(where, f"holds {len(value):,} characters, more than any file path ({MAX_PATH_CHARS:,})", None)
        return value

    def optional_text(self, value: Any, where: str) -> str | None:
        return None if value is None else self.text(value, where)

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            self.fail(where, f"must be a whole number from {low:,} to {high:,}", value)
        return value

    def seconds(self, value: Any, where: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_RANGE_SECONDS:
            self.fail(where, "must be a number of seconds ≥ 0", value)
        return float(value)

    def backend(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            self.fail("backend", "must be an object", value)
        kind = value.get("kind")
        if kind not in BACKEND_KINDS:
            self.fail("backend kind", f"must be one of {', '.join(BACKEND_KINDS)}", kind)
        allowed = ("kind",) if kind == "local" else ("kind", "server", "model", "dialect")
        for key in value:
            if key not in allowed:
                self.fail(f"backend {brief_repr(key)}", f"is not a field of a {kind} backend", None)
        out = {"kind": kind}
        for key in allowed[1:]:
            if key in value:
                out[key] = self.text(value[key], f"backend {key}")
        if "dialect" in out and out["dialect"] not in DIALECTS:
            self.fail("backend dialect", f"must be one of {', '.join(DIALECTS)}", out["dialect"])
        return out

    def usage(self, value: Any, where: str) -> dict[str, int] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(where, "must be an object of token counts or null", value)
        for key, count in value.items():
            if key not in USAGE_KEYS:
                self.fail(f"{where} {brief_repr(key)}", f"is not one of {', '.join(USAGE_KEYS)}", None)
            self.integer(count, f"{where} {key}", 0, MAX_COUNT)
        return dict(value) or None

    def turn(self, user: Any, assistant: Any, number: int, vocab_size: int | None, forbidden: set[int],
             local: bool = True) -> SavedTurn:  # fmt: skip
        for message, role, n in ((user, "user", number), (assistant, "assistant", number + 1)):
            if not isinstance(message, dict) or message.get("role") != role:
                self.fail(f"message {n}", f"must be {'an' if role == 'assistant' else 'a'} {role} message (questions and answers alternate)", None)
        where = f"message {number} (user)"
        user_text = self.text(user.get("text", ""), f"{where} text")
        media_list = user.get("media", [])
        if not isinstance(media_list, list):
            self.fail(f"{where} media", "must be a list", media_list)
        if len(media_list) > MAX_MEDIA_PER_TURN:
            self.fail(f"{where} media", f"holds {len(media_list)} items, over the limit of {MAX_MEDIA_PER_TURN}", None)
        media = tuple(self.media(m, f"{where} media {k}") for k, m in enumerate(media_list, start=1))

        where = f"message {number + 1} (assistant)"
        answer_text = self.text(assistant.get("text", ""), f"{where} text")
        ids = assistant.get("token_ids")
        if ids is not None and not isinstance(ids, list):
            self.fail(f"{where} token_ids", "must be a list of token ids", ids)
        highest = MAX_TOKEN_ID if vocab_size is None else vocab_size - 1
        for k, token in enumerate(ids or ()):
            self.integer(token, f"{where} token {k + 1}", 0, highest)
            if token in forbidden:
                self.fail(f"{where} token {k + 1}", "is an image placeholder token, which an answer never holds", token)
        finish = assistant.get("finish_reason")
        if finish is not None and finish not in FINISH_REASONS:
            self.fail(f"{where} finish_reason", f"must be one of {', '.join(FINISH_REASONS)}", finish)
        usage = self.usage(assistant.get("usage"), f"{where} usage")
        reply = answer_text
        if local and finish == "cancelled" and reply.endswith(CANCELLED_MARK):
            reply = reply.removesuffix(CANCELLED_MARK).removesuffix(" ")
        return SavedTurn(user_text, media, answer_text, None if ids is None else tuple(ids), finish, reply, usage)

    def media(self, m: Any, where: str) -> SavedMedia:
        if not isinstance(m, dict):
            self.fail(where, "must be an object", m)
        kind = m.get("kind")
        if kind not in ("image", "video"):
            self.fail(f"{where} kind", "must be image or video", kind)
        path = self.path(m.get("path"), f"{where} path")
        relative = m.get("relative_path")
        relative = None if relative is None else self.path(relative, f"{where} relative_path")
        sha = m.get("sha256", "")
        if not isinstance(sha, str) or sha and not _SHA256.fullmatch(sha):
            self.fail(f"{where} sha256", "must be 64 lowercase hex digits", sha)
        size_bytes = self.integer(m["bytes"], f"{where} bytes", 0, 1 << 62) if "bytes" in m else 0
        if kind == "image":
            max_tiles = self.integer(m.get("max_tiles", 12), f"{where} max_tiles", 1, MAX_TILES)
            tiles = self.integer(m.get("tiles"), f"{where} tiles", 1, max_tiles + 1)  # + the thumbnail
            size = m.get("size", [])
            if not isinstance(size, list) or len(size) not in (0, 2):
                self.fail(f"{where} size", "must be [width, height]", size)
            for value in size:
                self.integer(value, f"{where} size", 1, 1 << 31)
            return SavedMedia("image", path, relative, tiles, max_tiles, 8, None, sha, size_bytes,
                              (size[0], size[1]) if size else None)
        frames = self.integer(m.get("frames", m.get("tiles")), f"{where} frames", 1, MAX_FRAMES)
        tiles = self.integer(m.get("tiles", frames), f"{where} tiles", frames, frames)  # one tile per frame
        rng = m.get("range")
        video_range = None
        if rng is not None:
            if not isinstance(rng, list) or len(rng) != 2:
                self.fail(f"{where} range", "must be [start, end] in seconds or null", rng)
            start, end = self.seconds(rng[0], f"{where} range"), self.seconds(rng[1], f"{where} range")
            if not start < end:
                self.fail(f"{where} range", "must end after it starts", rng)
            video_range = (start, end)
        return SavedMedia("video", path, relative, tiles, 12, frames, video_range, sha, size_bytes)


def session_json(data: dict) -> str:
    """A session as the text of its file: JSON, non-ASCII kept readable, lone surrogates (the bytes
    of a file name that is not UTF-8) as `\\udcXX` escapes, which UTF-8 can hold, and characters that
    would drive or reorder a terminal as escapes (the same JSON text)."""
    text = _NUMBER_LIST.sub(_one_line, json.dumps(data, ensure_ascii=False, indent=1))
    return escape_hidden(text, surrogates=True)  # so `cat` or `less` on a session file shows the text inert


# A list of numbers as json.dumps(indent=1) writes it, one number per line. Only structural
# whitespace holds a raw line break (a string's is written `\n`), so the text of a string never matches.
_NUMBER_LIST = re.compile(r"\[\n *(-?[0-9][0-9.eE+-]*(?:,\n *-?[0-9][0-9.eE+-]*)*)\n *\]")


def _one_line(match: re.Match[str]) -> str:
    """A list of numbers (an answer's token ids: thousands) on one line, not one line each."""
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",\n")) + "]"


# --- media paths -------------------------------------------------------------------------------


def media_json_paths(path: Path, session_file: Path) -> dict[str, str]:
    """The path fields of one media item: absolute, and relative to the session file's folder."""
    absolute = Path(os.path.abspath(path))
    out = {"path": str(absolute)}
    try:
        out["relative_path"] = os.path.relpath(absolute, Path(os.path.abspath(session_file)).parent)
    except ValueError:  # another drive (Windows): no relative path exists
        pass
    return out


def media_candidates(media: SavedMedia, session_file: Path) -> list[Path]:
    """Where a saved media file may be now, best first.

    The saved absolute path; then, for a session file that was moved or copied (with its media),
    the media's place relative to the session file's folder, the saved path taken relative to
    that folder, and the same file name beside the session file.
    """
    folder = Path(os.path.abspath(session_file)).parent
    saved = _saved_path(file_system_name(media.path))  # "nö.png" saved under UTF-8, loaded under LC_ALL=C
    out = [saved] if saved.is_absolute() else []
    if media.relative_path:
        out.append(folder / file_system_name(media.relative_path))
    if not saved.is_absolute():
        out.append(folder / saved)
    out.append(folder / saved.name)
    unique: list[Path] = []
    for candidate in out:
        candidate = Path(os.path.normpath(candidate))
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _saved_path(text: str) -> Path:
    """A saved media path, `~` expanded. A `~user` that names no account here (a file saved on
    another machine, or edited) is kept as written: it is then a file not found, one media item's
    problem that --skip-missing leaves out, not an error that stops the whole /load."""
    try:
        return expand_home(text)
    except UsageError:  # no such user; no home folder for `~`
        return Path(text)
