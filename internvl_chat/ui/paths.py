"""Turning typed, pasted or dragged-and-dropped text into file paths.

Terminals paste a dropped file in several ways: quoted (`'/a b/cat.png' `), backslash-escaped
(`/a\\ b/cat.png `), or as a `file://` URI with percent-escapes; all of them, plus `~`, become
the same `Path` here. Nothing in this module checks that a file exists except
`find_media_paths`, which only reports paths that name existing image or video files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import UsageError
from ..files import expand_home, file_system_name, real_path, refuse_web_address, visible

# The extensions of the formats the loaders read (one table: media/formats.py), so a path typed in a
# message attaches every file /image reads; a .qoi or .tga was left in the text, without a word.
from ..media.formats import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, SHARED_VIDEO_EXTENSIONS, VIDEO_EXTENSIONS  # re-exported
from ..media.formats import is_transport_stream

# Punctuation that may hug a path typed in prose: "(see /tmp/cat.png)," or 「cat.png」。
_OPENERS = "([{<“‘「『《（"
_CLOSERS = ")]}>.,;:!?”’」』》）。，；：！？、"
_TOKEN = re.compile(r"(?:\\[\s\S]|\S)+")
_MAX_QUOTES = 256  # quote pairs are tried exhaustively; bound the work on odd input
_MAX_JOIN = 6  # words joined back together for a path typed with bare spaces
# No path to a file is longer (PATH_MAX is 4096 bytes, %XX triples them in a file: URI): a longer
# quoted span is prose, and not looking at it keeps a 1 MB paste with 256 quotes from copying
# 32,000 slices of half a megabyte (seconds).
_MAX_PATH_CHARS = 3 * 4096 + len("file://localhost")


def shell_unquote(word: str) -> str:
    """Remove shell quoting from one word: '…' literal, "…" with \\-escapes, and \\x outside quotes.

    Whitespace is kept as is (the word is never split). ValueError on an unclosed quote.
    """
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        c = word[i]
        if c == "\\":
            if i + 1 < n:
                out.append(word[i + 1])
                i += 2
            else:  # a lone trailing backslash stays
                out.append(c)
                i += 1
        elif c == "'":
            end = word.find("'", i + 1)
            if end < 0:
                raise ValueError("unclosed single quote")
            out.append(word[i + 1 : end])
            i = end + 1
        elif c == '"':
            i += 1
            while i < n and word[i] != '"':
                if word[i] == "\\" and i + 1 < n and word[i + 1] in '\\"$`':
                    i += 1
                out.append(word[i])
                i += 1
            if i >= n:
                raise ValueError("unclosed double quote")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# What a path may hold and still be typed back bare: anything else (spaces, quotes, backslashes,
# characters a shell reads specially) is quoted in hints.
_BARE_PATH = re.compile(r"[\w@%+=:,./-]+")


def quote_path(path: str | Path) -> str:
    """`path` as the user can type it back in a command: `normalize_path(quote_path(p)) == Path(p)`.

    A path with any character outside `_BARE_PATH` is single-quoted (a quote in it as '\\''); a
    relative one that would read as an option, a `~` path or a file: URI starts with ./ instead.
    """
    text = str(path)
    if text.startswith(("-", "~")) or text[:5].lower() == "file:":
        text = "./" + text
    if _BARE_PATH.fullmatch(text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def _strip_outer_space(text: str) -> str:
    """Strip surrounding whitespace, but keep a trailing space that is escaped (`cat\\ `)."""
    stripped = text.strip()
    trailing = text.rstrip()
    backslashes = len(trailing) - len(trailing.rstrip("\\"))
    if backslashes % 2 == 1 and len(trailing) < len(text):
        stripped += text[len(trailing)]
    return stripped


def _from_file_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"{uri} names a file on host {parts.netloc!r}; copy the file here and give a local path")
    # a name that is not UTF-8 (%FF) keeps its bytes, as the file system gives them (os.fsdecode),
    # instead of becoming U+FFFD and naming no file
    return unquote(parts.path, errors="surrogateescape")


def normalize_path(text: str) -> Path:
    """Typed, quoted, escaped, `~` or `file://` text -> a Path (not checked for existence)."""
    word = _strip_outer_space(text)
    if not word:
        raise UsageError("empty path; give the path of a file")
    try:
        word = shell_unquote(word)
    except ValueError:
        pass  # an apostrophe in a plain name ("it's.png"): take the text literally
    refuse_web_address(word)
    if word[:5].lower() == "file:":
        word = _from_file_uri(word)
    if not word.strip():  # quoted blanks ('   '): /save and /export wrote a file with an invisible name
        raise UsageError(f"empty path {text.strip()!r}; give the path of a file")
    if "\x00" in word:  # no file name holds one (os calls raise ValueError: embedded null byte)
        raise UsageError(f"the path '{visible(word)}' holds a NUL character, which no file name can; remove it")
    word = file_system_name(word)
    if word.startswith("~"):  # decided on the text: Path("./~x") drops the `./` and reads as ~x
        return expand_home(word)  # ~unknownuser: a UsageError saying so
    return Path(word)  # relative ones are anchored by the caller (App._output_path)


def media_kind(path: str | Path) -> str | None:
    """'image', 'video' or None, by file extension (case-insensitive); a .ts or .mts file that is
    there and is no MPEG transport stream (TypeScript source) is None."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in SHARED_VIDEO_EXTENSIONS and os.path.lexists(path) and not is_transport_stream(path):
        return None
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


_MEDIA_SUFFIXES = tuple(MEDIA_EXTENSIONS)
# Any media extension anywhere: a message without one names no media file, and is not searched
# word by word (a pasted 15 MB log took minutes there before the context check refused it).
_ANY_MEDIA_EXTENSION = re.compile("|".join(re.escape(ext) for ext in sorted(MEDIA_EXTENSIONS)), re.IGNORECASE)


def may_name_media(message: str) -> bool:
    """False when `message` cannot name a media file (it holds no media extension)."""
    return _ANY_MEDIA_EXTENSION.search(message) is not None


def _looks_like_media(raw: str) -> bool:
    """A cheap filter before touching the file system: the text ends in a media extension."""
    return raw.rstrip(" '\"").lower().endswith(_MEDIA_SUFFIXES)


def _candidates(message: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []

    # Quoted paths: every pair of the same quote character on one line (apostrophes in prose
    # make "the next quote closes it" unreliable, so all pairs are tried).
    quotes = [m.start() for m in re.finditer(r"['\"]", message)][:_MAX_QUOTES]
    for a, i in enumerate(quotes):
        for j in quotes[a + 1 :]:
            if j - i > _MAX_PATH_CHARS + 1:
                break
            if message[j] != message[i]:
                continue
            if "\n" in message[i:j]:
                break
            if _looks_like_media(message[i + 1 : j]):
                spans.append((i, j + 1))

    # Words (backslash-escaped spaces included), without the punctuation of the prose around them.
    words: list[tuple[int, int]] = []
    for m in _TOKEN.finditer(message):
        start, end = m.start(), m.end()
        while start < end and message[start] in _OPENERS:
            start += 1
        ends = [end]
        while end > start and message[end - 1] in _CLOSERS:
            end -= 1
            ends.append(end)
        words.append((start, ends[-1]))
        spans.extend((start, e) for e in ends if e > start and _looks_like_media(message[start:e]))

    # Paths typed with bare spaces ("/tmp/My Pictures/cat.png"): join words back together.
    for k, (_, end) in enumerate(words):
        if not _looks_like_media(message[words[k][0] : end]):
            continue
        for back in range(1, min(_MAX_JOIN, k) + 1):
            start = words[k - back][0]
            if "\n" in message[start:end]:
                break
            if message.startswith(("/", "~", "./", "../", "file:"), start):
                spans.append((start, end))
    return spans


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a word too long to be a file name (ENAMETOOLONG) is text
        return False


def find_media_paths(message: str, cwd: str | Path | None = None) -> list[tuple[tuple[int, int], Path]]:
    """Paths inside a message that name existing image or video files: [((start, end), path)].

    Spans index `message` (quotes and escapes included). Relative paths are resolved against
    `cwd` (default: the process's working directory). Overlapping candidates keep the earliest,
    longest one; a file named twice is reported once, at its first mention.
    """
    found: list[tuple[tuple[int, int], Path]] = []
    if not may_name_media(message):
        return found
    seen: set[Path] = set()
    taken_until = -1
    for start, end in sorted(set(_candidates(message)), key=lambda s: (s[0], s[0] - s[1])):
        if start < taken_until:
            continue
        try:
            path = normalize_path(message[start:end])
        except UsageError:
            continue
        if cwd is not None and not path.is_absolute():
            path = Path(cwd) / path
        if media_kind(path) is None or not is_file(path):
            continue
        taken_until = end
        key = real_path(path)
        if key not in seen:
            seen.add(key)
            found.append(((start, end), path))
    return found
