"""The file formats the media loaders read, and the file extensions that name them: one table that
`/image`, `--image` (image.py opens a file as any of IMAGE_FORMATS, whatever its name) and a path
typed in a message (ui/paths.py attaches a word only where its extension is listed here) share, so
that a format the loader reads is never left as text in a message (a .qoi or .tga was).

Pillow's own extensions for each format, checked against its registry by tests/test_paths.py;
HEIF is opened only with a plugin this app does not use (image.py names such a photo), so .heic
and .heif are not listed: a message naming one keeps it as text, and a folder pattern skips it.
"""

from __future__ import annotations

from ..files import open_regular_file

# The formats a file is opened as. Pillow would otherwise try some forty, among them EPS, which it
# renders by running Ghostscript on the file, and rarely used parsers; none of them is a photo.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "HEIF", "QOI")

# Pillow format -> the extensions Pillow registers for it (Image.registered_extensions()).
IMAGE_FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png", ".apng"),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "DIB": (".dib",),
    "TIFF": (".tif", ".tiff"),
    "ICO": (".ico",),
    "PPM": (".pbm", ".pgm", ".ppm", ".pnm", ".pfm"),
    "TGA": (".tga", ".icb", ".vda", ".vst"),
    "JPEG2000": (".jp2", ".j2k", ".jpc", ".jpf", ".jpx", ".j2c"),
    "AVIF": (".avif", ".avifs"),
    "QOI": (".qoi",),
}

# The video loader opens whatever container FFmpeg (PyAV) reads; these are the containers it is
# built and tested for, each end to end (header, length at attach, frames decoded by decord or, where
# decord cannot or does not seek exactly, PyAV): MP4/MOV/M4V/3GP/3G2, MKV/WebM, AVI, MPEG-PS
# (.mpg, .mpeg: no length stored, its frames counted by demuxing), MPEG-TS (.ts, .m2ts, .mts: PyAV),
# FLV, Ogg (.ogv: PyAV) and ASF (.wmv, .asf).
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".flv",
    ".ogv", ".wmv", ".asf",
})  # fmt: skip
# Extensions TypeScript source shares (.ts, and .mts for its ES modules): a file so named is taken
# for a video only where it is an MPEG transport stream (`is_transport_stream`), so that a path to
# app.ts typed in a message stays text and a `clips/*` pattern or Tab completion passes it by.
SHARED_VIDEO_EXTENSIONS = frozenset({".ts", ".mts"})
IMAGE_EXTENSIONS = frozenset(ext for exts in IMAGE_FORMAT_EXTENSIONS.values() for ext in exts)
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


TS_PACKET_SIZES = (188, 192)  # MPEG-TS, and BDAV (.m2ts, .mts: a 4-byte time code before each packet)


def is_transport_stream(path) -> bool:
    """Whether the file starts as an MPEG transport stream: its sync byte 0x47 at the start of its
    first two packets (188 bytes apart, or 192 with BDAV's time codes). False for a file that cannot
    be read, or is not a regular file (a FIFO is not waited on)."""
    try:
        with open_regular_file(path) as f:
            head = f.read(2 * 192 + 4)
    except (OSError, ValueError):
        return False
    return any(len(head) > lead + size and head[lead] == head[lead + size] == 0x47
               for size in TS_PACKET_SIZES for lead in (0, size - 188))  # fmt: skip
