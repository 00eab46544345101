from __future__ import annotations

import os
from pathlib import Path

import pytest

from internvl_chat.errors import UsageError
from internvl_chat.ui.commands import Command, parse_line
from internvl_chat.ui.paths import find_media_paths, media_kind, normalize_path, quote_path, shell_unquote


pytestmark = pytest.mark.usefixtures("fixed_home")  # ~ expands to /home/tester


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("/tmp/cat.png", "/tmp/cat.png"),
        ("relative/cat.png", "relative/cat.png"),
        # quotes, as GNOME Terminal and others drop files
        ("'/tmp/my cat.png'", "/tmp/my cat.png"),
        ('"/tmp/my cat.png"', "/tmp/my cat.png"),
        ("'/tmp/it'\\''s.png'", "/tmp/it's.png"),
        ('"/tmp/say \\"hi\\".png"', '/tmp/say "hi".png'),
        ("'/tmp/back\\slash.png'", "/tmp/back\\slash.png"),  # nothing is special in '…'
        # backslash escapes, as macOS Terminal and iTerm drop files
        ("/tmp/my\\ cat.png", "/tmp/my cat.png"),
        ("/tmp/my\\ cat\\ \\(1\\).png", "/tmp/my cat (1).png"),
        ("/tmp/a\\&b.png", "/tmp/a&b.png"),
        # drag-and-drop leaves whitespace around the path
        ("'/tmp/my cat.png' ", "/tmp/my cat.png"),
        ("  /tmp/my\\ cat.png \n", "/tmp/my cat.png"),
        ("/tmp/trailing\\ ", "/tmp/trailing "),  # an escaped trailing space is part of the name
        # an apostrophe in a plain name is not a quote
        ("/tmp/it's.png", "/tmp/it's.png"),
        # home directory
        ("~/pics/cat.png", "/home/tester/pics/cat.png"),
        ("'~/my pics/cat.png'", "/home/tester/my pics/cat.png"),
        ("~", "/home/tester"),
        # file:// URIs, percent-decoded
        ("file:///tmp/cat.png", "/tmp/cat.png"),
        ("file:///tmp/my%20cat.png", "/tmp/my cat.png"),
        ("file://localhost/tmp/my%20cat.png", "/tmp/my cat.png"),
        ("'file:///tmp/%E7%8C%AB.png' ", "/tmp/猫.png"),
        ("FILE:///tmp/x%2By.png", "/tmp/x+y.png"),
        # unescaped spaces typed as one argument stay in the name
        ("/tmp/猫 写真.jpg", "/tmp/猫 写真.jpg"),
    ],
)
def test_normalize_path(typed, expected):
    assert normalize_path(typed) == Path(expected)


@pytest.mark.parametrize("typed", ["", "   ", "\n", "''", '""', "file://", "'   '", '" "', "\\ "])
def test_empty_path_is_an_error(typed):
    with pytest.raises(UsageError, match="empty path") as error:
        normalize_path(typed)
    assert not str(error.value).endswith(".")  # as every other error line


@pytest.mark.parametrize("typed", ["a\x00.json", "'dir/a\x00b.md'", "file:///tmp/a%00.png"])
def test_a_nul_character_is_no_path(typed):
    with pytest.raises(UsageError, match="holds a NUL character") as error:  # os calls raised ValueError
        normalize_path(typed)
    assert "\x00" not in str(error.value)  # shown as an escape


@pytest.mark.parametrize("typed", ["https://example.com/cat.png", "HTTP://x/a.jpg", "'ftp://host/my clip.mp4'"])
def test_a_web_address_is_said_to_be_one(typed, tmp_path):
    # it became a path with one slash, "image https:/example.com/cat.png does not exist; check the path"
    from internvl_chat.ui.setup import _flag_files

    with pytest.raises(UsageError, match="is a web address; internvl-chat reads local files only") as error:
        normalize_path(typed)
    assert "://" in str(error.value)
    with pytest.raises(UsageError, match="is a web address"):
        _flag_files(shell_unquote(typed), "image", "--image")  # --image, as the shell passes it
    assert find_media_paths(f"What is in {typed}?", tmp_path) == []  # in a message it is text


def test_a_file_uri_of_a_name_that_is_not_utf8_finds_the_file(tmp_path):
    """A file manager writes the byte 0xFF of a Latin-1 name as %FF; it was decoded as U+FFFD,
    a name no file has ('does not exist')."""
    name = tmp_path.as_posix().encode() + b"/caf\xe9.png"
    with open(name, "wb") as f:
        f.write(b"x")
    path = normalize_path(f"file://{tmp_path.as_posix()}/caf%E9.png")
    assert os.fsencode(path) == name and path.is_file()


def test_remote_file_uri_is_an_error():
    with pytest.raises(UsageError, match="otherhost"):
        normalize_path("file://otherhost/tmp/cat.png")


@pytest.mark.parametrize(
    "path, quoted",
    [
        ("/tmp/chat.json", "/tmp/chat.json"),
        ("/tmp/my chats/chat.json", "'/tmp/my chats/chat.json'"),
        ("/tmp/it's.json", r"'/tmp/it'\''s.json'"),
        ('/tmp/say "hi".md', """'/tmp/say "hi".md'"""),
        (r"/tmp/a\b.json", r"'/tmp/a\b.json'"),
        ("/tmp/$HOME & (1);*.json", "'/tmp/$HOME & (1);*.json'"),
        ("/tmp/tab\there.json", "'/tmp/tab\there.json'"),
        ("/tmp/照片 1.json", "'/tmp/照片 1.json'"),
        ("/tmp/照片.json", "/tmp/照片.json"),
        ("--force", "./--force"),
        ("~me.json", "'./~me.json'"),
        ("file:x.json", "./file:x.json"),
        ("'", r"''\'''"),
    ],
)
def test_quote_path_is_read_back_as_the_same_path(path, quoted):
    assert quote_path(path) == quoted
    assert normalize_path(quoted) == Path(path)
    for name in ("save", "export"):  # as a confirm hint has it
        assert parse_line(f"/{name} {quoted} --force") == Command(name, (Path(path),), {"force": True})


def test_shell_unquote_rejects_unclosed_quotes():
    with pytest.raises(ValueError):
        shell_unquote("'/tmp/cat.png")
    with pytest.raises(ValueError):
        shell_unquote('"/tmp/cat.png')


@pytest.mark.parametrize(
    "name, kind",
    [
        ("a.jpg", "image"),
        ("a.JPEG", "image"),
        ("a.png", "image"),
        ("a.webp", "image"),
        ("a.bmp", "image"),
        ("a.gif", "image"),
        ("a.tif", "image"),
        ("a.TIFF", "image"),
        ("a.mp4", "video"),
        ("a.mkv", "video"),
        ("a.MOV", "video"),
        ("a.avi", "video"),
        ("a.webm", "video"),
        ("a.m4v", "video"),
        ("a.txt", None),
        ("a.png.txt", None),
        ("png", None),
        ("dir/", None),
    ],
)
def test_media_kind(name, kind):
    assert media_kind(name) == kind
    assert media_kind(Path(name)) == kind


def _pillow_extensions() -> dict[str, str]:
    """Every extension Pillow registers -> its format."""
    from PIL import Image

    Image.init()
    return Image.registered_extensions()


def test_every_format_the_image_loader_reads_is_an_image_path():
    # `-p "describe /tmp/x.qoi"` sent the path as text, without a word, though /image reads a QOI
    from internvl_chat.media.image import IMAGE_FORMATS, image_formats

    readable = set(image_formats()) & set(IMAGE_FORMATS)
    loader = {ext: fmt for ext, fmt in _pillow_extensions().items() if fmt in readable}
    assert {"QOI", "TGA", "AVIF", "ICO", "PPM", "JPEG2000"} <= set(loader.values())
    assert {ext: media_kind("x" + ext.upper()) for ext in loader} == dict.fromkeys(loader, "image")


def test_the_image_extension_table_is_pillows_for_the_formats_the_loader_opens():
    from internvl_chat.media.formats import IMAGE_FORMAT_EXTENSIONS, IMAGE_FORMATS

    assert set(IMAGE_FORMAT_EXTENSIONS) <= set(IMAGE_FORMATS)  # no extension of a format the loader never tries
    pillow = _pillow_extensions()  # a Pillow built without an optional plugin (AVIF) registers none for it
    table = {ext: fmt for fmt, exts in IMAGE_FORMAT_EXTENSIONS.items() for ext in exts if fmt in pillow.values()}
    assert table == {ext: fmt for ext, fmt in pillow.items() if fmt in IMAGE_FORMAT_EXTENSIONS}
    assert media_kind("x.heic") is None and media_kind("x.txt") is None  # HEIF needs a plugin not used here


@pytest.mark.parametrize("name", ["x.qoi", "x.tga", "x.avif", "x.ico", "x.pnm", "x.jp2", "X.PGM", "x.jfif"])
def test_a_message_path_of_every_image_format_the_loader_reads_is_found(tmp_path, name):
    (tmp_path / name).write_bytes(b"not looked at here")
    message = f"describe {tmp_path / name}, please"
    assert find_media_paths(message) == [((9, 9 + len(str(tmp_path / name))), tmp_path / name)]
    assert find_media_paths(f"the {name.split('.')[1]} format, qoi.txt and tga are words") == []


# --- finding paths in messages -----------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    names = ["cat.png", "My Pics/dog 1.jpg", "clip.mp4", "notes.txt", "it's.webp", "猫.png", "b.JPG"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with a media name is not a file
    return tmp_path


def found(message: str, cwd: Path | None = None) -> list[tuple[str, Path]]:
    """(the text of each span, the path)."""
    return [(message[a:b], path) for (a, b), path in find_media_paths(message, cwd=cwd)]


def test_plain_absolute_path(files):
    p = files / "cat.png"
    assert found(f"what is in {p}?") == [(str(p), p)]


def test_quoted_path_with_spaces(files):
    p = files / "My Pics" / "dog 1.jpg"
    assert found(f"describe '{p}' please") == [(f"'{p}'", p)]
    assert found(f'describe "{p}" please') == [(f'"{p}"', p)]


def test_escaped_path_with_spaces(files):
    p = files / "My Pics" / "dog 1.jpg"
    typed = str(p).replace(" ", "\\ ")
    assert found(f"describe {typed} please") == [(typed, p)]


def test_file_uri(files):
    p = files / "My Pics" / "dog 1.jpg"
    uri = "file://" + str(p).replace(" ", "%20")
    assert found(f"look: {uri}") == [(uri, p)]


def test_path_with_bare_spaces(files):
    p = files / "My Pics" / "dog 1.jpg"
    assert found(f"compare {p} with the other one") == [(str(p), p)]


def test_relative_paths_resolve_against_cwd(files):
    assert found("look at cat.png.", cwd=files) == [("cat.png", files / "cat.png")]
    assert found("look at cat.png.", cwd=files / "My Pics") == []


def test_punctuation_around_paths(files):
    p, q = files / "cat.png", files / "猫.png"
    assert found(f"(see {p}), then 「{q}」。") == [(str(p), p), (str(q), q)]


def test_apostrophes_in_prose_do_not_confuse_quotes(files):
    assert found("what's in 'cat.png'? it's nice", cwd=files) == [("'cat.png'", files / "cat.png")]
    p = files / "it's.webp"
    assert found(f"what's {p}? don't know") == [(str(p), p)]


def test_several_files_in_order_and_each_once(files):
    a, v, b = files / "cat.png", files / "clip.mp4", files / "b.JPG"
    message = f"{v} and {a}\nand {b} and again {a}"
    assert [path for _, path in found(message)] == [v, a, b]


@pytest.mark.parametrize(
    "message",
    [
        "no paths here",
        "/nonexistent/dir/cat.png",
        "{files}/notes.txt",
        "{files}/folder.png",
        "{files}/missing.png",
        "https://example.com/cat.png",
        "{files}/cat.pngx",
    ],
)
def test_nothing_found(files, message):
    assert found(message.format(files=files)) == []


def test_a_name_too_long_for_the_file_system_is_no_path(tmp_path):
    """stat() fails with ENAMETOOLONG, not ENOENT: the word is text, not a traceback."""
    long_name = "x" * 300 + ".png"
    assert find_media_paths(f"look at /tmp/{long_name} and {long_name}", tmp_path) == []


def test_quoted_spans_longer_than_any_path_are_not_looked_at(tmp_path, monkeypatch):
    """A 1 MB paste with 256 quotes on one line: each of the 32,000 quote pairs copied its span
    (half a megabyte on average) to look for a line break and an extension, seconds of work."""
    from internvl_chat.ui import paths

    looked = []
    real = paths._looks_like_media
    monkeypatch.setattr(paths, "_looks_like_media", lambda raw: looked.append(raw[:1]) or real(raw))
    (tmp_path / "a b.png").write_bytes(b"")
    message = ("x" * 4000 + "'") * 256 + " see 'a b.png'"
    found = find_media_paths(message, tmp_path)
    assert len(looked) < 1000  # each quote is paired with the few near it, not with all 255 others
    assert [path.name for _, path in find_media_paths("look at 'a b.png' 'it''s'", tmp_path)] == ["a b.png"]
    assert found == []  # the quote of 'a b.png' is past the first 256 quotes: only words are tried there
