"""Reading files we did not write, writing files atomically, and showing file-derived text safely.

Every text file the app reads (sessions, scripts, configs, checkpoint JSON) is untrusted: it must
be a regular file (a FIFO would block forever, a device would never end), it is read with a size
limit, and its bytes must be UTF-8. Every file the app writes is written to a temporary file in
the same folder and renamed over the target, so a crash never leaves half a file and a symlink at
the target is replaced, never followed.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, TextIO

from .errors import UsageError

try:  # POSIX: how many bytes wait in a pipe (unread_bytes)
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

MiB = 1 << 20
TEXT_LIMIT = 16 * MiB  # sessions, scripts, configs: far above any real one
JSON_LIMIT = 64 * MiB  # tokenizer files (Qwen2's tokenizer.json is ~7 MiB); checkpoint JSON takes TEXT_LIMIT
_CHUNK = 1 << 20  # reads in chunks so Ctrl-C is seen between them


class NoHomeFolder(UsageError):
    """HOME is unset and the user has no account entry (a container run as an arbitrary uid)."""

    def __init__(self, what: str, fix: str = "set HOME, or give a full path"):
        super().__init__(f"{what} is in the home folder, which is unknown (HOME is not set and this user has no "
                         f"account entry); {fix}")  # fmt: skip


# a web address where a local path goes: as a Path it loses a slash ("https:/example.com/cat.png
# does not exist"), which hid why nothing was found there
_WEB_ADDRESS = re.compile(r"(?:https?|ftp)://", re.IGNORECASE)


def is_web_address(text: str | Path) -> bool:
    """Whether `text`, as typed (not yet a Path), is a web address rather than a local path."""
    return _WEB_ADDRESS.match(os.fspath(text)) is not None


def refuse_web_address(text: str | Path, named: str = "", fix: str = "download it and give the file's path") -> None:
    """A UsageError where `text` (as typed) is a web address: it says so, `named` ("config file ")
    before it, and that only local files are read, then `fix`."""
    if is_web_address(text):
        raise UsageError(f"{named}{visible(os.fspath(text))} is a web address; internvl-chat reads local files only: {fix}")


def expand_home(path: str | Path) -> Path:
    """`path` with a leading `~` / `~user` expanded, decided on its text; a UsageError when `~user` names no account (where
    Path.expanduser raises RuntimeError), rather than a folder literally named `~user`."""
    text = os.fspath(path)
    if not text.startswith("~"):
        # `./~draft.png` is a file in this folder: Path drops the `./`, and a later expand_home
        # would read what is left as ~user, so it is anchored at the working folder
        plain = Path(text)
        return working_folder(text, "the file") / plain if plain.parts and plain.parts[0].startswith("~") else plain
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path)[1:].split("/", 1)[0]
        if not user:  # `~` itself: no HOME and no account entry
            raise NoHomeFolder(visible(str(path))) from None
        raise UsageError(f"{visible(str(path))}: there is no user '{visible(user)}' for ~{visible(user)}; "
                         "give the full path") from None  # fmt: skip


def working_folder_gone() -> bool:
    """True when the process's working folder no longer exists (deleted or moved away since the
    app started in it): a relative path then names nothing, and os.getcwd() raises."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


WORKING_FOLDER_GONE = "the working folder no longer exists (it was deleted or moved)"
FULL_PATH_FIX = "give a full path (one starting with / or ~), or cd to an existing folder and start internvl-chat there"


def check_working_folder(path: str | Path, what: str, error: type[Exception] = UsageError) -> None:
    """Raise `error` (one line, with what to do) when `path` is relative and the working folder is
    gone: the relative paths of commands, flags and messages are checked here, so none says only
    "No such file or directory" of a file that may well exist."""
    if not Path(path).is_absolute():
        working_folder(path, what, error)


def working_folder(path: str | Path, what: str, error: type[Exception] = UsageError) -> Path:
    """The working folder, to anchor the relative `path` at; `error` when it is gone (see
    `check_working_folder`)."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        raise error(f"{WORKING_FOLDER_GONE}, so {what} {visible(str(path))} cannot be found or written there; "
                    f"{FULL_PATH_FIX}") from None


def xdg_dir(env: Mapping[str, str], name: str, default: str) -> Path:
    """$XDG_<name>, or ~/`default` when it is unset, empty or relative: the XDG spec makes a
    relative one invalid (it would put sessions and caches under whatever folder the app was
    started in)."""
    value = env.get(name) or ""
    if os.path.isabs(value):
        return Path(value)
    try:
        return Path(env.get("HOME") or Path.home()) / default
    except RuntimeError:  # Path.home() without HOME, for a uid with no account entry
        raise NoHomeFolder(f"~/{default}", f"set HOME or ${name}") from None


class NotRegularFile(OSError):
    """What `open_regular_file` found is a FIFO, a device or a socket: reading it could block
    forever or never end."""


def open_regular_file(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file.

    It is opened without blocking and checked through its descriptor, not by a look at the path
    before: a FIFO, a device or a socket (one swapped in after any check too) raises
    NotRegularFile instead of waiting forever for a writer; a folder raises IsADirectoryError.
    Other OSErrors come as they are.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a pipe or a device?)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_bytes_file(path: str | Path, what: str, limit: int = TEXT_LIMIT, error: type[Exception] = UsageError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else raises `error` (one line).

    Opened by `open_regular_file`, so a FIFO, a device or a file swapped for one after a check
    cannot hang or flood the app.
    """
    path = Path(path)
    shown = visible(str(path))
    try:
        file = open_regular_file(path)
    except FileNotFoundError:
        if os.path.islink(path):  # `ls` shows it: say why it cannot be read (an interrupted download's link)
            raise error(f"{what} {shown} is a link to a file that does not exist; check the path") from None
        check_working_folder(path, what, error)  # a relative path in a folder deleted since: say so
        raise error(f"{what} {shown} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {shown} is a folder, not a file; give a file") from None
    except NotRegularFile:
        raise error(f"{what} {shown} is not a regular file (a pipe or a device?); save it to a file first") from None
    except OSError as e:
        raise error(f"cannot read {what} {shown} ({e.strerror or e}); check the path and its permissions") from None
    with file:
        try:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise error(f"{what} {shown} is {size / MiB:,.1f} MiB, over the {limit / MiB:,.0f} MiB limit; "
                            "is it the right file?")  # fmt: skip
            # it may grow while we read it
            too_big = error(f"{what} {shown} is over the {limit / MiB:,.0f} MiB limit; is it the right file?")
            return _read_all(file.fileno(), limit, too_big)
        except OSError as e:
            raise error(f"cannot read {what} {shown} ({e.strerror or e}); check the file") from None


def read_stream(fd: int, what: str, limit: int = TEXT_LIMIT, error: type[Exception] = UsageError) -> bytes:
    """All bytes of an open stream (stdin: a pipe, a file or a device), at most `limit` of them.

    Read in chunks, so Ctrl-C ends a read that waits for a writer, and an endless device stops
    at the limit instead of filling the memory.
    """
    try:
        return _read_all(fd, limit, error(f"{what} holds more than {limit / MiB:,.0f} MiB; pass a smaller text"))
    except OSError as e:
        raise error(f"cannot read {what} ({e.strerror or e})") from None


def unread_bytes(fd: int) -> int:
    """How many bytes `fd` (stdin) holds that nothing has read: the rest of a redirected file, or
    what waits in a pipe or socket now. Never reads, so nothing is taken from it; 0 when unknown."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return max(st.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
        if fcntl is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):
        pass
    return 0


def _read_all(fd: int, limit: int, too_big: Exception) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        block = os.read(fd, _CHUNK)
        if not block:
            return b"".join(parts)
        total += len(block)
        if total > limit:
            raise too_big
        parts.append(block)


# Byte-order marks of text that is not UTF-8 (Windows Notepad's "Unicode" is UTF-16): its NUL bytes
# read as binary data, so it is named by its encoding instead. UTF-32's first: UTF-16 LE's starts it.
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def refuse_wide_text(data: bytes, what: str, error: type[Exception] = UsageError) -> None:
    """Raise `error` (one line, with the command that converts it) when `data` starts with a
    UTF-16 or UTF-32 byte-order mark."""
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise error(f"{what} is {encoding} text, not UTF-8; save it as UTF-8 (iconv -f {encoding} -t UTF-8)")


def decode_utf8(data: bytes, what: str, error: type[Exception] = UsageError) -> str:
    """`data` as UTF-8 (a BOM is dropped), or one line saying where the first bad byte is."""
    refuse_wide_text(data, what, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None


def read_text_file(path: str | Path, what: str, limit: int = TEXT_LIMIT, error: type[Exception] = UsageError) -> str:
    """A regular UTF-8 text file of at most `limit` bytes (see `read_bytes_file`)."""
    return decode_utf8(read_bytes_file(path, what, limit, error), f"{what} {visible(str(path))}", error)


def real_path(path: str | Path) -> Path:
    """`path` with its links followed, as Path.resolve gives it, for telling whether two paths
    name one file. Never raises: a symlink loop (Python 3.11's resolve raised RuntimeError, a
    traceback for a message naming one) is left as it is written from there on; a relative path
    whose working folder is gone (os.getcwd() raises) names no file, and is given as it is."""
    try:
        return Path(os.path.realpath(path))
    except FileNotFoundError:
        return Path(path)


def is_special_file(path: str | Path) -> bool:
    """True for a FIFO, a device or a socket at `path` (a link is not followed): never a file to
    write over (as root, renaming over /dev/null would replace the device)."""
    try:
        kind = os.lstat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(kind) or stat.S_ISLNK(kind) or stat.S_ISDIR(kind))


# Files that hold a conversation (sessions, exports), as the input history does: private to their
# owner (their new folders too), never readable by the other users of a shared machine.
PRIVATE_FILE_MODE = 0o600


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically: a temp file in the same folder, fsync, rename, fsync the folder.

    A symlink at `path` is replaced by the new file, never followed; a folder, a FIFO or a device
    there is refused (as root, renaming over /dev/null would replace the device). Missing folders
    are created, private (0700) when `mode` is private (no bits for the group and others).
    OSError propagates (the caller names the user's path, never the temp file's).
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(21, "is a folder", str(path))
    if is_special_file(path):
        raise OSError(errno.EEXIST, "not a regular file (a device or a pipe?), so it is not replaced", str(path))
    payload = data.encode("utf-8") if isinstance(data, str) else data
    folder_mode = 0o700 if not mode & 0o077 else 0o777
    _make_folders(path.parent, folder_mode)
    try:
        # the name cut short (32 characters: at most 128 bytes): a target name near the 255-byte limit
        # must not make the temp name too long
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only folder: the error named the temp file, which the user never asked for
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        try:
            os.fchmod(fd, mode & ~current_umask())
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable: until the folder's entry reaches the disk, a power cut can
    leave the old file (or none). Best effort: some file systems cannot sync a folder, and the
    file is already written in full either way."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_private_folders(folder: Path) -> None:
    """`folder` and its missing parents, each private (0700): where a private file goes (the input history)."""
    _make_folders(folder, 0o700)


def _make_folders(folder: Path, mode: int) -> None:
    """`folder` and its missing parents, each created with `mode` (Path.mkdir gives it to the last only)."""
    missing = []
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:
            if not folder.is_dir():  # a file stands where a folder is needed: say so, not "File exists"
                raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(folder)) from None


def current_umask() -> int:
    """The process's umask, read from /proc/self/status where Linux has it there (4.7 and later).
    Elsewhere reading it means setting it and putting it straight back, and a file another thread
    creates in between gets mode 0666 (0777 for a folder): writable by every user."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0)
    os.umask(current)
    return current


# C0 and C1 controls, DEL, and the Unicode characters that reorder, hide or break text on screen
# (bidi marks, overrides and isolates, zero-width and invisible marks, the line and paragraph
# separators): none of them may reach the terminal from a file.
_INVISIBLE = {*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F,
              0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF}  # fmt: skip
_VISIBLE = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _INVISIBLE}
_VISIBLE.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x1B: "\\e"})


# Those past the C1 controls (bidi marks, overrides and isolates, zero-width marks, the line and
# paragraph separators): prompt_toolkit draws C0 and C1 controls in the input line as ^X and <8x>, these raw.
# The zero-width joiner and non-joiner are left out: they are ordinary text (Persian and Indic words,
# emoji sequences such as a family), shown as <200d> in the input line they broke what one typed.
_JOINERS = {0x200C, 0x200D}
FORMAT_CHARS = "".join(chr(c) for c in sorted(_INVISIBLE) if c >= 0xA0 and c not in _JOINERS)
_FORMAT_CHAR = re.compile(f"[{FORMAT_CHARS}]")


def has_format_char(text: str) -> bool:
    """Whether `text` holds an invisible character past the controls (U+202E, U+200B, U+2028 …)."""
    return _FORMAT_CHAR.search(text) is not None


# Lone surrogates: bytes that were not UTF-8 (argv, environment and file names are decoded with
# surrogateescape) or JSON `\\udXXX` escapes. No terminal encoding can print them; show the byte.
_VISIBLE.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})
_VISIBLE.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000) if c not in _VISIBLE})


# What JSON leaves raw (it escapes C0 controls only) that drives, reorders or hides text on a
# terminal: DEL, C1 controls, zero-width marks, bidi overrides and isolates, the byte-order mark
_HIDDEN_CHARS = "\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff"
_HIDDEN = re.compile(f"[{_HIDDEN_CHARS}]")
_HIDDEN_OR_SURROGATE = re.compile(f"[{_HIDDEN_CHARS}\ud800-\udfff]")


def escape_hidden(quoted: str, surrogates: bool = False) -> str:
    """JSON text (or a TOML basic string made by json.dumps) with those characters written as `\\u`
    escapes, the same value, inert under `cat`; with `surrogates`, lone surrogates too (the bytes of
    a file name that is not UTF-8, which a JSON file holds so; TOML has no escape for them)."""
    pattern = _HIDDEN_OR_SURROGATE if surrogates else _HIDDEN
    return pattern.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def visible(text: str) -> str:
    """`text` for one line on a terminal: control, escape and bidi characters shown as `\\x..` escapes.

    Lone surrogates (undecodable bytes of a file name or argument) are shown as `\\xNN` too, so
    printing the result can never fail with an encoding error.
    """
    text = text.translate(_VISIBLE)
    return text.translate(_GLYPHS_AS_ESCAPES) if _GLYPHS_AS_ESCAPES else text


# The app's own glyphs (and rich's) as plain ASCII, for an output encoding that cannot hold them
# (PYTHONIOENCODING=ascii, LC_ALL=C without UTF-8 mode): "thinking \u2026", "640\xd7400 \u2192 7 tiles"
# came out as escapes. Any other character it cannot hold is still written as an escape.
ASCII_GLYPHS = {
    "\u2026": "...", "\u00b7": "-", "\u2192": "->", "\u2190": "<-", "\u2248": "~", "\u00d7": "x", "\u2265": ">=", "\u2264": "<=",
    "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": "-", "\u2014": "--", "\u2022": "*",
    "\u258c": "|", "\u2500": "-", "\u2501": "-", "\u2550": "=", "\u2502": "|", "\u2503": "|", "\U0001f306": "[image]",
}  # fmt: skip
GLYPHS_OR_ESCAPES = "internvl_chat.glyphs"  # the error handler's name, as `errors=` of a stream's encoding


def _glyphs_or_escapes(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    unencodable = error.object[error.start : error.end]
    return "".join(ASCII_GLYPHS.get(c) or c.encode("ascii", "backslashreplace").decode() for c in unencodable), error.end


codecs.register_error(GLYPHS_OR_ESCAPES, _glyphs_or_escapes)

# Those of ASCII_GLYPHS that `visible` escapes (cli.main sets them): the handler writes an "–" of a
# file name as "-", the name of another file ("a–b.png" read "a-b.png"), as it writes the app's own.
_GLYPHS_AS_ESCAPES: dict[int, str] = {}


def escape_glyphs_in_visible(encodings: Iterable[str | None]) -> None:
    """`visible` (file names, untrusted text) escapes each of ASCII_GLYPHS that a stream of one of
    `encodings` cannot hold, so the error handler never writes one as the ASCII text it resembles."""
    _GLYPHS_AS_ESCAPES.clear()
    for encoding in encodings:
        _GLYPHS_AS_ESCAPES.update({ord(c): c.encode("ascii", "backslashreplace").decode() for c in ASCII_GLYPHS if not can_encode(encoding, c)})


def can_encode(encoding: str | None, text: str) -> bool:
    """Whether a stream of `encoding` (None: UTF-8) writes `text` as it is."""
    try:
        text.encode(encoding or "utf-8")
    except (UnicodeError, LookupError):
        return False
    return True


TOO_LONG_PATH_SHOWN = 100  # characters of a path the file system found too long that an error shows


def too_long_path_line(path: str, what: str = "") -> str:
    """The error for a path the file system refused as too long (ENAMETOOLONG), `what` naming its
    use ("image"), the path cut short: a pasted 5,000-character one came back whole, some 60 rows."""
    shown = path if len(path) <= TOO_LONG_PATH_SHOWN else path[:TOO_LONG_PATH_SHOWN] + "…"
    named = f"{what} " if what else ""
    return f"cannot use {named}{visible(shown)}: the path is too long for the file system; give a shorter one"


def shortened(text: str, width: int = 40) -> str:
    """`text` cut to `width` characters, the last one "…", where it is longer (a pasted 5,000-digit
    number, a 100,000-character key would fill the screen)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def visible_shortened(text: str, width: int = 40) -> str:
    """`visible(shortened(text, width))`, the "…" that cuts it the app's own glyph (an ASCII output
    writes it "...", where `visible` escapes one of the text's)."""
    cut = shortened(text, width)
    return visible(cut) if cut is text else visible(cut[:-1]) + "\u2026"


def brief_repr(value: Any, width: int = 40) -> str:
    """A value for an error message: its repr, cut to `width` characters, printable."""
    return visible_shortened(repr(value), width)


def visible_lines(text: str) -> str:
    """`visible` for multi-line text: newlines and tabs are kept, every other control is escaped."""
    return "\n".join("\t".join(visible(part) for part in line.split("\t")) for line in text.split("\n"))


# `visible` for a path written into a file (an /export link): a byte of the name that is not UTF-8
# stays that byte, written back with surrogateescape, so the link still names the file.
_VISIBLE_NAME = {c: shown for c, shown in _VISIBLE.items() if not 0xDC80 <= c < 0xDD00}


def visible_file_name(text: str) -> str:
    """`text` (a path) with every control, escape and bidi character shown as in `visible`, its undecodable bytes kept."""
    return text.translate(_VISIBLE_NAME)


_SURROGATE = re.compile("[\ud800-\udfff]")


def undecodable_byte(text: str) -> int | None:
    """The first byte that was not UTF-8 in `text` (decoded with surrogateescape), or None.

    Any lone surrogate counts: one from a JSON `\\ud800` escape is no text either (its code
    point is returned then, above 0xff).
    """
    m = _SURROGATE.search(text)
    if m is None:
        return None
    c = ord(m.group())
    return c - 0xDC00 if 0xDC80 <= c < 0xDD00 else c


def typed_as_utf8(text: str) -> str:
    """Text typed at a terminal, which Python decoded under an ASCII locale (PYTHONIOENCODING=ascii,
    LC_ALL=C with UTF-8 mode off): each byte of "é" a surrogate, and the text was refused as not
    UTF-8. Its bytes are read again as UTF-8; bytes that are not UTF-8 stay surrogates (refused in
    one line). Paths typed as flags are not passed here: the file system gets their bytes back as they are."""
    if undecodable_byte(text) is None:
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return text


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate (see `undecodable_byte`) as U+FFFD, as a bad byte decodes."""
    return _SURROGATE.sub("\ufffd", text)


# What binary data starts with, for a message that says what the data is instead of "bad UTF-8".
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
)
# ISO BMFF files (an `ftyp` box first, as MP4 has) whose major brand is a still picture's: HEIF, as
# iPhones save photos (.heic), and AVIF. Their sequence brands (hevc, msf1, avis) hold a track that
# video readers play, and stay videos.
_STILL_BRANDS = {
    b"heic": "a HEIC image", b"heix": "a HEIC image", b"heim": "a HEIC image", b"heis": "a HEIC image",
    b"mif1": "a HEIF image", b"avif": "an AVIF image",
}  # fmt: skip
STILL_BMFF_KINDS = tuple(sorted(set(_STILL_BRANDS.values())))
IMAGE_KINDS = ("a PNG image", "a JPEG image", "a GIF image", "a BMP image", "a TIFF image", "a WebP image", *STILL_BMFF_KINDS)



def is_video_kind(kind: str | None) -> bool:
    """Whether a `sniff_binary` answer is a video: "a video (MP4/MOV)", "a video (AVI)" or "a Matroska/WebM video"."""
    return bool(kind) and (kind.startswith("a video") or kind.endswith(" video"))

SNIFF_BYTES = 8192  # what sniff_binary looks at


def file_head(path: str | Path) -> bytes:
    """A regular file's first SNIFF_BYTES bytes, to tell what it is (OSError propagates; a FIFO or
    device is NotRegularFile, never waited on)."""
    with open_regular_file(path) as f:
        return f.read(SNIFF_BYTES)


def sniff_file(path: str | Path) -> str | None:
    """sniff_binary of the file's first bytes (OSError propagates)."""
    return sniff_binary(file_head(path))


def sniff_binary(data: bytes) -> str | None:
    """What `data` is when it is not text ("a PNG image", "a video", "binary data"), else None.

    Decided from the first bytes only: a known signature, or a NUL byte (text never holds one).
    """
    head = data[:SNIFF_BYTES]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "a video (AVI)"
    if head[4:8] == b"ftyp":
        return _STILL_BRANDS.get(head[8:12], "a video (MP4/MOV)")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return "binary data" if b"\x00" in head else None


# --- the standard streams ---------------------------------------------------------------------


class OutputFailed(Exception):
    """stdout could not be written (a full disk, a closed pipe): the run cannot go on."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


def silence_stdout() -> None:
    """After stdout failed or was given up on: send fd 1 to /dev/null so the final flush at exit
    cannot fail (or wait on a reader that does not read) again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


class GuardedStream:
    """sys.stdout or sys.stderr with its write errors made explicit.

    stdout: an OSError becomes OutputFailed, which ends the run with one line on stderr (no
    traceback). stderr: diagnostics that cannot be written are dropped, so a full or closed stderr
    never ends a run that is otherwise fine.
    """

    def __init__(self, stream: TextIO, fatal: bool):
        self._stream = stream
        self._fatal = fatal

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if self._fatal:
                raise OutputFailed(e) from None
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if self._fatal:
                raise OutputFailed(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def file_system_name(text: str) -> str:
    """Text (UTF-8, as the REPL, a script, the prompt and a session file hold it) as the name Python gives the
    file system: under an ASCII locale (LC_ALL=C without UTF-8 mode) a name's other bytes are
    surrogates (os.fsdecode), and "nö.png" as typed named no file (`/image`: "does not exist"; in a
    message a UnicodeEncodeError, a traceback; a session's media "had vanished" at /load). Elsewhere the text is the name as it is."""
    if codecs.lookup(sys.getfilesystemencoding()).name != "ascii" or text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("ascii", "surrogateescape")  # os.fsdecode's, of its bytes


def name_as_text(name: str) -> str | None:
    """A name the file system listed (os.listdir, os.scandir) as the text that names it when typed,
    `file_system_name`'s inverse: under an ASCII locale "nö.png" is listed with each byte of "ö" a
    surrogate, and typed (read as UTF-8) it is "nö.png". None when its bytes are not UTF-8: no typed
    line holds them (the app refuses such a line)."""
    if name.isascii():
        return name
    try:
        return os.fsencode(name).decode("utf-8")
    except UnicodeError:
        return None
