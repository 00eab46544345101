"""What an image file's headers hold, read before Pillow opens it: Pillow reads some headers an item
at a time in Python and keeps what it reads, and decodes an icon's picture as it opens the file, so
a few kilobytes can cost it gigabytes and minutes before any size check could refuse them
(`header_flood`, `icon_picture_size`); and how many scans a JPEG holds (`jpeg_scans`). Each walk
reads a bounded amount through one cached page and returns a count or a size: image.py refuses
(it opens the file once for the first two)."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import BmpImagePlugin, IcoImagePlugin, PngImagePlugin

from ..files import open_regular_file


@contextlib.contextmanager
def quiet_pillow():
    """Pillow's warnings about a file (corrupt EXIF, odd TIFF tags, large images) silenced: they
    would print two lines of Python source location each; what matters is said as a MediaError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


ICO_MAGIC = b"\x00\x00\x01\x00"


def icon_picture_size(f: BinaryIO) -> tuple[int, int] | None:
    """The size of the picture Pillow decodes as it opens an ICO file (`f`, opened for reading), from
    that picture's own header; None for another file, or one whose header does not read (opening it
    says why). The icon's directory says 256×256 at most, but the PNG or BMP it points to declares
    any size, and Pillow decodes it whole on opening, within only its own global limit: a 95 KB icon
    holding a PNG of 1×50,000,000 took 655 MB and 2 s to be refused by the MAX_SIDE check that came after."""
    try:
        with quiet_pillow():
            offset = _icon_picture_at(f)
            if offset is None:
                return None
            f.seek(offset)
            head = f.read(24)
            if head[:8] == PngImagePlugin._MAGIC:  # its IHDR's (the PNG's chunks are the header walk's to count)
                return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) if head[12:16] == b"IHDR" else None
            f.seek(offset)
            width, height = BmpImagePlugin.DibImageFile(f).size
            return width, height // 2  # an icon's BMP counts the rows of its transparency mask too
    except Exception:  # noqa: BLE001 - OSError, SyntaxError, IndexError (no entries), …: Pillow's opening reports it
        return None


def _icon_picture_at(f: BinaryIO) -> int | None:
    """Where the picture Pillow decodes as it opens an ICO file starts (the largest), or None for another file."""
    f.seek(0)
    if f.read(4) != ICO_MAGIC:
        return None
    f.seek(0)
    return IcoImagePlugin.IcoFile(f).entry[0].offset


# Pillow reads a header a segment, chunk or block at a time in Python, keeping what most of them hold
# (a PNG's chunks after its pixels too, as it loads them): a 48 MB JPEG of 12 million empty segments
# took 14 s and 1.8 GB to open, a 10 MB GIF of 5 million comment blocks 650 MB. Real files have a
# few dozen (a PNG one per 8 KB or so of pixels, a GIF's XMP one per ~80 bytes of it); the JPEG
# limit is MAX_JPEG_SEGMENTS.
MAX_PNG_CHUNKS = 1 << 20
MAX_GIF_BLOCKS = 1 << 16
# Whether a GIF is animated is read past its first frame, whose pixels are sub-blocks of 255 bytes at
# most: one within image.MAX_PIXELS (LZW codes of 12 bits at most) holds ~1.1 million. Pillow walks
# them, and every block up to the next frame, one at a time in Python, without a limit.
MAX_GIF_WALK = 1 << 21
# A TIFF's lists that Pillow turns whole into Python values as it opens the file (a strip's or tile's
# offset each: a 64 MB TIFF of 16×16 pixels listing 8 million strips took 2.2 GB and 14 s to open,
# a minute to decode). A picture within MAX_SIDE has at most MAX_SIDE strips of a row each.
TIFF_LISTS = {258: "BitsPerSample", 273: "StripOffsets", 279: "StripByteCounts", 320: "ColorMap", 324: "TileOffsets",
              325: "TileByteCounts", 338: "ExtraSamples"}  # fmt: skip
MAX_TIFF_VALUES = 1 << 20  # image.MAX_SIDE
# A PPM's header is read a byte at a time, comments and blanks included: 24 MB of them took 5 s
PPM_HEADER_BYTES = 1 << 16
_PPM_GAP = re.compile(rb"(?:[ \t\n\v\f\r]+|#[^\r\n]*)*")  # blanks and comments (to the end of the line)
_PPM_TOKEN = re.compile(rb"[^ \t\n\v\f\r#]*")
# Pillow walks a JPEG 2000 file's boxes up to its header and those in it one at a time in Python: 3
# million empty ones took 4 s
MAX_JP2_BOXES = 1 << 16
# Pillow strips each comment among a plain-text PNM's numbers by copying the rest of the megabyte it
# is in: a 4 MB file of two million empty comments took 36 s
MAX_PNM_COMMENTS = 1 << 10


class _Pages:
    """Reads of a file here and there through one cached page, for the header walks."""

    PAGE = 1 << 20

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._base, self._page = f, 0, b""

    def at(self, offset: int, need: int) -> tuple[bytes, int]:
        """A page and where `offset` falls in it, read anew from `offset` where the cached one lacks
        `need` bytes from there (fewer than `need` follow `offset` only at the end of the file)."""
        if not self._base <= offset <= self._base + len(self._page) - need:
            self._f.seek(offset)
            self._page, self._base = self._f.read(self.PAGE), offset
        return self._page, offset - self._base


def header_flood(f: BinaryIO) -> str | None:
    """What the file (`f`, opened for reading) is ("a JPEG of more than 65,536 …") where its header
    holds more segments, chunks or blocks than a real one has, else None (a file that does not read:
    opening it says why)."""
    try:
        pages = _Pages(f)
        magic, _ = pages.at(0, 8)
        if magic.startswith(b"\xff\xd8\xff") and _jpeg_header_steps(pages) > MAX_JPEG_SEGMENTS:
            return f"a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments or fill bytes before its picture (real ones have a few dozen)"
        if magic.startswith(PngImagePlugin._MAGIC) and _png_chunks(pages, 0) > MAX_PNG_CHUNKS:
            return f"a PNG of more than {MAX_PNG_CHUNKS:,} chunks (real ones have one per 8 KB or so of pixels)"
        if magic[:4] == ICO_MAGIC and _icon_png_chunks(f, pages) > MAX_PNG_CHUNKS:
            return f"an icon holding a PNG of more than {MAX_PNG_CHUNKS:,} chunks (real ones have one per 8 KB or so of pixels)"
        if magic[:6] in (b"GIF87a", b"GIF89a") and _gif_blocks(pages) > MAX_GIF_BLOCKS:
            return f"a GIF of more than {MAX_GIF_BLOCKS:,} comment or other extension blocks before its first frame"
        if magic[:1] == b"P" and magic[1:2] in b"0123456fy":
            end = _ppm_header_end(pages)
            if end > PPM_HEADER_BYTES:
                return f"a PPM whose header runs past its first {PPM_HEADER_BYTES:,} bytes (real ones take a few dozen)"
            if magic[1:2] in b"123" and _comments_from(f, end) > MAX_PNM_COMMENTS:
                return f"a plain-text PNM of more than {MAX_PNM_COMMENTS:,} comments among its pixels (real ones have them in the header)"
        if magic[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" and _jp2_boxes(pages) > MAX_JP2_BOXES:
            return f"a JPEG 2000 file of more than {MAX_JP2_BOXES:,} boxes around its header (real ones have a few dozen)"
        if magic[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # TIFF, BigTIFF
            name, values = _tiff_longest_list(pages)
            if values > MAX_TIFF_VALUES:
                return f"a TIFF whose {name} tag lists {values:,} values (real ones list one per strip or tile, {MAX_TIFF_VALUES:,} at most)"
    except (OSError, OverflowError):  # OverflowError: an offset past 2^63 (BigTIFF's), where no file reaches
        pass
    return None


def _jpeg_header_steps(pages: _Pages) -> int:
    """The segments, fill and stray bytes before the first scan (Pillow takes each on its own), up to
    one past MAX_JPEG_SEGMENTS."""
    steps, at = 0, 2
    while steps <= MAX_JPEG_SEGMENTS:
        page, i = pages.at(at, 4)
        if len(page) - i < 4:
            return steps  # the end of the file
        found = _JPEG_MARKER.search(page, i)
        if found is None or found.end() + 2 > len(page):  # on in the next page (from the marker, or the last byte: 0xFF?)
            end = found.start() if found is not None else len(page) - 1
            steps, at = steps + end - i, at + end - i
            continue
        steps += found.start() - i + 1
        marker = page[found.start() + 1]
        if marker in (0xDA, 0xD9):  # SOS, EOI
            return steps
        at += found.end() - i
        if marker not in (0x01, 0xD8):  # markers without a length
            at += int.from_bytes(page[found.end() : found.end() + 2], "big")
    return steps


def _icon_png_chunks(f: BinaryIO, pages: _Pages) -> int:
    """_png_chunks of the PNG an ICO file holds, the one Pillow decodes as it opens the file (0 for a BMP)."""
    try:
        with quiet_pillow():
            start = _icon_picture_at(f)
    except Exception:  # noqa: BLE001 - SyntaxError, IndexError (no entries), …: Pillow's opening reports it
        return 0
    page, i = pages.at(start, 8)
    return _png_chunks(pages, start) if page[i : i + 8] == PngImagePlugin._MAGIC else 0


def _png_chunks(pages: _Pages, start: int) -> int:
    """The chunks of the PNG at `start` up to IEND (Pillow takes each on its own), up to one past MAX_PNG_CHUNKS."""
    chunks, at = 0, start + 8
    while chunks <= MAX_PNG_CHUNKS:
        page, i = pages.at(at, 8)
        if len(page) - i < 8:
            return chunks
        chunks += 1
        if page[i + 4 : i + 8] == b"IEND":
            return chunks
        at += 12 + int.from_bytes(page[i : i + 4], "big")  # length, type, data, CRC
    return chunks


def _gif_blocks(pages: _Pages) -> int:
    """The extensions' sub-blocks before the first frame (Pillow reads each on its own), up to one
    past MAX_GIF_BLOCKS."""
    page, _ = pages.at(0, 13)
    if len(page) < 13:
        return 0
    flags = page[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while blocks <= MAX_GIF_BLOCKS:
        page, i = pages.at(at, 2)
        if len(page) - i < 2 or page[i] != 0x21:  # a frame, the end, damage: for Pillow to read
            return blocks
        at += 2  # the introducer and the extension's label, then its sub-blocks up to an empty one
        while blocks <= MAX_GIF_BLOCKS:
            page, i = pages.at(at, 1)
            if len(page) - i < 1:
                return blocks
            blocks += 1
            at += 1 + page[i]
            if not page[i]:
                break
    return blocks


def gif_frame_follows(f: BinaryIO) -> bool:
    """Whether a second frame follows a GIF's first (`f`, opened for reading), found within
    MAX_GIF_WALK sub-blocks; False where the file ends, is damaged or holds more before it."""
    pages = _Pages(f)
    page, _ = pages.at(0, 13)
    if len(page) < 13 or page[:6] not in (b"GIF87a", b"GIF89a"):
        return False
    at = 13 + (3 << ((page[10] & 7) + 1) if page[10] & 0x80 else 0)  # after the global colour table
    frames, budget = 0, MAX_GIF_WALK
    while budget > 0:
        page, i = pages.at(at, 11)
        if len(page) - i >= 11 and page[i] == 0x2C:  # a frame: its descriptor, colour table, code size, pixels
            if frames:
                return True
            frames, flags = 1, page[i + 9]
            at += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        elif len(page) - i >= 2 and page[i] == 0x21:  # an extension: introducer and label, then its sub-blocks
            at += 2
        else:  # the trailer, the end of the file, damage
            return False
        at, budget = _after_sub_blocks(pages, at, budget)
    return False


def _after_sub_blocks(pages: _Pages, at: int, budget: int) -> tuple[int, int]:
    """Where the sub-blocks from `at` end (after the empty one), and the budget they leave; a budget of
    0 where they run out first or the file ends inside them."""
    while budget > 0:
        page, i = pages.at(at, 1)
        if len(page) - i < 1:
            return at, 0
        size, budget, at = page[i], budget - 1, at + 1 + page[i]
        if not size:
            return at, budget
    return at, 0


def _ppm_header_end(pages: _Pages) -> int:
    """Where a PPM's header (its magic number, then its size and maximum value, or scale) ends, if
    within PPM_HEADER_BYTES; a number past them where it runs on."""
    page, _ = pages.at(0, PPM_HEADER_BYTES + 1)
    head = page[: PPM_HEADER_BYTES + 1]
    at = _PPM_TOKEN.match(head).end()
    for _ in range(2 if head[:at] in (b"P1", b"P4") else 3):  # bitmaps have no maximum value
        at = _PPM_TOKEN.match(head, _PPM_GAP.match(head, at).end()).end()
    return at


def _comments_from(f: BinaryIO, start: int) -> int:
    """The comment signs (#) from `start` to the end of the file, up to one past MAX_PNM_COMMENTS."""
    f.seek(start)
    count = 0
    while count <= MAX_PNM_COMMENTS and (block := f.read(1 << 20)):
        count += block.count(b"#")
    return count


def _jp2_boxes(pages: _Pages) -> int:
    """The boxes Pillow reads a JPEG 2000 file's header through: those up to its header box (jp2h),
    those in it, and those of its resolution box (res ) up to the one it reads (resc); up to one
    past MAX_JP2_BOXES."""
    count = 0
    for kind, start, end in _jp2_box_list(pages, 0, 1 << 62):
        count += 1
        if kind == b"jp2h":
            for kind, start, end in _jp2_box_list(pages, start, end):
                count += 1
                if kind == b"res ":
                    for kind, _, _ in _jp2_box_list(pages, start, end):
                        count += 1
                        if kind == b"resc" or count > MAX_JP2_BOXES:
                            break
                if count > MAX_JP2_BOXES:
                    break
            return count
        if count > MAX_JP2_BOXES:
            break
    return count


def _jp2_box_list(pages: _Pages, at: int, end: int):
    """(type, where its contents start, where it ends) for the boxes from `at` to `end`; they end
    where one is damaged or the file does."""
    while at + 8 <= end:
        page, i = pages.at(at, 16)
        if len(page) - i < 8:
            return
        size, kind, head = int.from_bytes(page[i : i + 4], "big"), page[i + 4 : i + 8], 8
        if size == 1:  # the size follows, in 8 bytes
            size, head = int.from_bytes(page[i + 8 : i + 16], "big"), 16
        elif size == 0:  # to the end
            size = end - at
        if size < head:
            return
        yield kind, at + head, at + size
        at += size


def _tiff_longest_list(pages: _Pages) -> tuple[str, int]:
    """The longest of the TIFF_LISTS in the first directory (the one Pillow opens): its name and its
    number of values; ("", 0) where there is none or the header does not read."""
    head, _ = pages.at(0, 16)
    order = "little" if head[:2] == b"II" else "big"
    version = int.from_bytes(head[2:4], order)
    if len(head) < 16 or version not in (42, 43):
        return "", 0
    # classic TIFF: 4-byte offsets, 2-byte entry counts, 12-byte entries; BigTIFF: 8, 8 and 20
    at, count_size, entry_size = (int.from_bytes(head[4:8], order), 2, 12) if version == 42 else (int.from_bytes(head[8:16], order), 8, 20)
    page, i = pages.at(at, count_size)
    entries = min(int.from_bytes(page[i : i + count_size], order), 1 << 16)
    longest = ("", 0)
    for k in range(entries):
        page, i = pages.at(at + count_size + k * entry_size, entry_size)
        if len(page) - i < entry_size:
            break
        tag, values = int.from_bytes(page[i : i + 2], order), int.from_bytes(page[i + 4 : i + 4 + (entry_size - 4) // 2], order)
        if tag in TIFF_LISTS and values > longest[1]:
            longest = (TIFF_LISTS[tag], values)
    return longest


def tiff_second_picture(f: BinaryIO) -> int | None:
    """The NewSubfileType (tag 254; 0 where it is left out) of the second picture of a TIFF (`f`, opened
    for reading), or None where there is none: no second directory, or one that lists no width and
    height or does not read. Read from the two directories' entries, where Pillow's seek turns every
    value of the second one into Python values (the first is checked before it opens the file): a 16×16
    TIFF of 8 MB whose second picture listed 2 million strips took 7.5 s and 590 MB."""
    try:
        pages = _Pages(f)
        head, _ = pages.at(0, 16)
        if len(head) < 16 or head[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return None
        order, big = ("little" if head[:2] == b"II" else "big"), head[2:4] in (b"+\0", b"\0+")
        first = int.from_bytes(head[8:16] if big else head[4:8], order)
        second = _tiff_directory(pages, first, order, big)[1]
        if not second or second == first:
            return None
        tags = _tiff_directory(pages, second, order, big)[0]
    except (OSError, OverflowError):
        return None
    return tags.get(254, 0) if 256 in tags and 257 in tags else None


def _tiff_directory(pages: _Pages, at: int, order: str, big: bool) -> tuple[dict[int, int], int]:
    """A TIFF directory's single-number tags (tag → value) and the next directory's offset; ({}, 0)
    where it does not read."""
    count_size, entry_size, value_size = (8, 20, 8) if big else (2, 12, 4)
    page, i = pages.at(at, count_size)
    if len(page) - i < count_size:
        return {}, 0
    entries = int.from_bytes(page[i : i + count_size], order)
    if entries > 1 << 16:  # a classic TIFF's count holds no more; a BigTIFF's claiming more is damaged
        return {}, 0
    tags = {}
    for k in range(entries):
        page, i = pages.at(at + count_size + k * entry_size, entry_size)
        if len(page) - i < entry_size:
            return {}, 0
        kind, count = int.from_bytes(page[i + 2 : i + 4], order), int.from_bytes(page[i + 4 : i + 4 + value_size], order)
        width = {3: 2, 4: 4, 16: 8}.get(kind)  # SHORT, LONG, LONG8
        if width is not None and count == 1:
            value_at = i + 4 + value_size
            tags[int.from_bytes(page[i : i + 2], order)] = int.from_bytes(page[value_at : value_at + width], order)
    page, i = pages.at(at + count_size + entries * entry_size, value_size)
    return tags, int.from_bytes(page[i : i + value_size], order) if len(page) - i >= value_size else 0


def jpeg_scans(path: Path) -> int:
    """How many scans (SOS markers) the picture holds. A progressive JPEG's decoder passes over the
    whole picture for each scan, and a scan can be 31 bytes: a 683 KB JPEG of 4000×4000 with 20,000
    of them took 33 s to decode. Counted up to the picture's end (EOI), where the decoder stops: a
    phone's motion photo appends its video there, and 20 MB of compressed video hold 0xFF 0xDA some
    300 times by chance (within the picture 0xFF is stuffed as 0xFF 0x00), which refused the photo.

    The picture's first JPEG_WALK_BYTES are read, not mapped: a file truncated while a mapping of it
    is read kills the process (SIGBUS)."""
    try:
        with open_regular_file(path) as f:
            head = f.read(JPEG_WALK_BYTES)
            scans = _scans_before_end(head, whole=len(head) < JPEG_WALK_BYTES)
            if scans is None:
                f.seek(0)
                scans = _sos_markers(f)
    except OSError:  # NotRegularFile is one
        return 0  # the decoder reports the file's trouble
    return scans


# A marker: 0xFF then neither a stuffed 0x00, a fill byte 0xFF nor a restart marker (0xD0…0xD7, within a scan)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
# Segments a picture may have: a progressive one has a few dozen, a camera's some more
MAX_JPEG_SEGMENTS = 1 << 16
# What the walk to the picture's end reads: a phone's photo ends well within it (its video follows)
JPEG_WALK_BYTES = 64 << 20


def _scans_before_end(data: bytes, whole: bool = True) -> int | None:
    """The SOS segments from SOI to EOI, each segment skipped by its length (an EXIF thumbnail's own
    markers are inside one); None for a file of more segments than a picture has, or where `data`
    (not `whole`: the file's start) ends before the picture does."""
    scans, at = 0, 2
    for _ in range(MAX_JPEG_SEGMENTS):
        found = _JPEG_MARKER.search(data, at)
        if found is None or (not whole and found.end() + 2 > len(data)):
            return scans if whole else None
        marker = data[found.start() + 1]
        if marker == 0xD9:  # EOI
            return scans
        if marker in (0x01, 0xD8):  # markers without a length
            at = found.end()
            continue
        scans += marker == 0xDA
        at = found.end() + int.from_bytes(data[found.end() : found.end() + 2], "big")
    return None


def _sos_markers(f: BinaryIO) -> int:
    """Every 0xFF 0xDA of the file, within the picture or not: the count for a file of countless
    segments, or whose picture does not end within JPEG_WALK_BYTES."""
    count, carry = 0, b""
    while block := f.read(1 << 20):
        data = carry + block
        count += data.count(b"\xff\xda")
        carry = data[-1:] if data.endswith(b"\xff") else b""
    return count
