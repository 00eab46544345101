"""Which media files a message or `/image` names, and what to say about the words that name none.

paths.py reads one path from typed text; this module looks the paths up (a script's folder, then
the working folder), takes them out of a message, expands the wildcards of `/image`, `/video` and
--image/--video, and explains the words that name no file (a missing file, a path with bare
spaces, a question typed after the paths).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError
from ..files import FULL_PATH_FIX, WORKING_FOLDER_GONE, real_path, visible, working_folder_gone
from ..numbers import counted
from .commands import WILDCARD, command_start, quote_spaced, split_words
from .paths import SHARED_VIDEO_EXTENSIONS, find_media_paths, is_file, may_name_media, media_kind, normalize_path

MAX_JOINED_WORDS = 6  # /image words tried together as one path typed with bare spaces
# images one /image pattern may attach: past any context at one tile each, and each match is read
# and hashed before the context check (`~/Pictures/*.jpg` over 20,000 photos took minutes to refuse)
MAX_PATTERN_MATCHES = 100


def take_media_paths(text: str, cwd: Path | None = None, search_dirs: Sequence[Path] = ()) -> tuple[str, list[Path], list[Path]]:
    """The media paths typed in a message: (the message without them, the files that exist, the
    paths of media files that do not). One-shot and REPL messages go through this alike.

    Relative paths are looked up in `search_dirs` (a script's folder), then in `cwd`."""
    if not may_name_media(text):  # no word to look at (a long paste is not split word by word)
        return text, [], []
    found: list[tuple[tuple[int, int], Path]] = []
    for folder in (*search_dirs, cwd):  # an earlier folder wins a span
        found += [(span, path) for span, path in find_media_paths(text, folder)
                  if not any(span[0] < end and start < span[1] for (start, end), _ in found)]  # fmt: skip
    found.sort(key=lambda item: item[0])
    kept, last = [], 0
    for (start, end), _ in found:
        kept.append(text[last:start])
        last = end
    kept.append(text[last:])
    rest = "".join(kept)
    if found:  # tidy the gap a path leaves: "What is in ?" -> "What is in?"
        rest = re.sub(r"[ \t]{2,}", " ", rest)
        rest = re.sub(r"[ \t]+([.,;:!?)\]])", r"\1", rest)
        rest = "\n".join(_without_bare_commands(text.split("\n"), [line.strip() for line in rest.split("\n")])).strip()
    # the missing are looked for outside the paths found: the first word of `/x/scan.png 2.png describe`
    # was said not to exist, and the message, its question left, refused as only a missing path
    outside = " ".join(kept)
    return rest, [path for _, path in found], _missing_media_paths(outside, {real_path(p) for _, p in found}, (*search_dirs, cwd))


_ATTACH_COMMANDS = ("/image", "/video")


def _without_bare_commands(typed: list[str], left: list[str]) -> list[str]:
    """`left` (the lines of a message, its paths taken) without the lines that held `/image PATH` or
    `/video PATH` and now hold only the command: pasted below the question's first line, such a
    line is text, its path is attached, and the model read a stray "/image"."""
    if len(typed) != len(left):  # a quoted path across lines: nothing to match line by line
        return left
    # an invisible mark before the slash ("\u200b/image", copied from a web page) is a command's too
    return [line for line, was in zip(left, typed)
            if command_start(line).lower() not in _ATTACH_COMMANDS or was.strip() == line]


def not_attached(path: Path, outcome: str = "it was not attached") -> str:
    """The warning for a path `take_media_paths` gives as missing: why it was not attached
    (`outcome`: what became of it)."""
    if not path.is_absolute() and working_folder_gone():
        return f"{visible(str(path))} was not found: {WORKING_FOLDER_GONE}, so {outcome}; {FULL_PATH_FIX}"
    why = "is not a file (a folder, a device or a pipe)" if _exists(path) else "does not exist"
    return f"{visible(str(path))} {why}, so {outcome}; check the path"


def only_missing_paths(text: str, missing: Sequence[Path]) -> bool:
    """True when `text` (what `take_media_paths` left of a message) is nothing but the paths it gave
    as missing, one a word: a mistyped `/tmp/cat.png` alone was sent, the path read as the question."""
    return bool(missing) and len(split_words(text)) == len(missing)


def not_sent(missing: Sequence[Path]) -> str:
    """The error for a message that `only_missing_paths` holds."""
    others = len(missing) - 1
    more = f" (and {counted(others, 'more path')} that {'names' if others == 1 else 'name'} no file)" if others else ""
    return not_attached(missing[0], f"the message, only its path{more}, was not sent")


MISSING_SHOWN = 5  # paths said not to be attached, one line each: a pasted log naming thousands printed a line for each


def not_attached_lines(missing: Sequence[Path]) -> list[str]:
    """The warnings for the paths `take_media_paths` gives as missing: one each for the first
    MISSING_SHOWN, then one line for the rest."""
    lines = [not_attached(path) for path in missing[:MISSING_SHOWN]]
    if len(missing) > MISSING_SHOWN:
        lines.append(f"{len(missing) - MISSING_SHOWN:,} more paths of pictures or videos name no file, so they "
                     "were not attached either")  # fmt: skip
    return lines


def _missing_media_paths(text: str, found: set[Path], folders: Sequence[Path | None]) -> list[Path]:
    """Words that look like paths of media files that are not files in any of `folders` (said, not
    silently ignored: a name of a FIFO or a folder too); a relative one is named as in the last folder."""
    missing = []
    for word in split_words(text):
        raw = word.raw.strip("()[]{}<>,;:!?\"'")
        if not raw.startswith(("/", "~", "./", "../", "file:")) or media_kind(raw.rstrip(".")) is None:
            continue
        if Path(raw.rstrip(".")).suffix.lower() in SHARED_VIDEO_EXTENSIONS:
            continue  # ./src/app.ts, not there: a TypeScript file to be, likelier than a video gone
        try:
            path = normalize_path(raw.rstrip("."))
        except UsageError:
            continue
        # a relative path found beside a script was attached, and still said not to exist in the working folder
        candidates = [path] if path.is_absolute() else [path if folder is None else Path(folder) / path for folder in folders]
        if not any(is_file(candidate) or real_path(candidate) in found for candidate in candidates):
            missing.append(next((candidate for candidate in candidates if _exists(candidate)), candidates[-1]))
    return missing


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system: no such file
        return False


def expand_wildcards(path: Path, resolve: Callable[[Path], Path], places: Callable[[Path], list[Path]],
                     kind: str = "image", what: str = "/image") -> list[Path]:  # fmt: skip
    """`/image shots/*.png`: a path holding * ? or [ that names no file, and ends in an extension
    of `kind` ("image" or "video") or *, is a pattern, as in a shell; it stands for the files of
    that kind it matches, in name order (it said "does not exist"). A file of that very name wins.

    `resolve`: the file a path names; `places`: where a path is looked for, in order; `what`: the
    command or flag that attaches them, as errors name it."""
    text = str(path)
    # `cats?` in `/image cat.png How many cats?` is a word of a question, not a pattern
    pattern = WILDCARD.search(text) and (media_kind(text) == kind or text.endswith("*"))
    if not pattern or _exists(resolve(path)):
        return [path]
    for full in places(path):
        found = sorted(Path(p) for p in glob.glob(str(full)) if media_kind(p) == kind and is_file(Path(p)))
        if len(found) > MAX_PATTERN_MATCHES:
            raise UsageError(f"{visible(str(path))} matches {len(found):,} {kind}s; {what} attaches at most "
                             f"{MAX_PATTERN_MATCHES} at once, so narrow the pattern")  # fmt: skip
        if found:
            return found
    raise UsageError(f"no {kind} file matches {visible(str(path))}; check the pattern")


def check_typed_paths(paths: Sequence[Path], resolve: Callable[[Path], Path]) -> None:
    """Words of `/image` that name nothing, where what was meant is plain: the error was only
    "…/My does not exist" for `/image ~/My Pics/cat.png` (one path with bare spaces) and
    "image How does not exist" for `/image cat.png How many?` (a question after the path).

    `resolve`: the file a path names."""
    for i, path in enumerate(paths):
        if _exists(resolve(path)):
            continue
        shown = visible(str(path))
        for j in range(i + 1, min(len(paths), i + MAX_JOINED_WORDS)):
            joined = Path(" ".join(str(p) for p in paths[i : j + 1]))
            if is_file(resolve(joined)):
                raise UsageError(f"{shown} does not exist; a path with spaces goes in quotes: /image {quote_spaced(str(joined))}")
        if i and not any(media_kind(p) for p in paths[i:]):
            raise UsageError(f"{shown} is not a file: /image takes only paths, so send the question as the next message "
                             "(or name the file in it)")  # fmt: skip
