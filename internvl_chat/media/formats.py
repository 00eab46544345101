"""The file formats the media loaders read, and the file extensions that name them: one table that
`/image`, `--image` (image.py opens a file as any of IMAGE_FORMATS, whatever its name) and a path
typed in a message (ui/paths.py attaches a word only where its extension is listed here) share, so
that a format the loader reads is never left as text in a message (a .qoi or .tga was).

Pillow's own extensions for each format, checked against its registry by tests/test_media_paths.py;
HEIF is opened only with a plugin this app does not use (image.py names such a photo), so .heic
and .heif are not listed: a message naming one keeps it as text, and a folder pattern skips it.
"""

from __future__ import annotations

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
# built and tested for (MP4/MOV/M4V, MKV/WebM, AVI: video_header.py's checks name them).
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXTENSIONS = frozenset(ext for exts in IMAGE_FORMAT_EXTENSIONS.values() for ext in exts)
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
