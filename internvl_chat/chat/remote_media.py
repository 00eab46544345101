"""What is sent for a picture or a video's frames, made once so that every resend is byte-identical.

Images go as the file's own bytes when every server reads them as we do (JPEG and PNG without
EXIF rotation or transparency); otherwise as a PNG made once from the picture our own pipeline
sees (rotated upright, transparency on white): `image_payload`. Video frames go as 448×448 JPEGs,
one tile each, made back from the tiles our frame sampler decoded: `frames_as_jpeg`. `RemoteMedia`
keeps what was made.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import MediaError
from ..media.image import (IMAGENET_MEAN, IMAGENET_STD, ffmpeg_decodes, image_formats, keyed_out, pending_orientation,
                           qoi_decoded, sixteen_bit_rgb_key, to_rgb, upright)
from ..media.image_headers import quiet_pillow
from .dialects import Clip, Picture
from .remote_errors import shorten
from .session import Media

SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png"}  # read alike by PIL, stb_image, lmdeploy, vLLM
JPEG_QUALITY = 95


@dataclass
class RemoteMedia(Media):
    """A Media with what is sent for it, made once: a picture, or a video's frames."""

    picture: Picture | None = field(default=None, repr=False)
    clip: Clip | None = field(default=None, repr=False)

    @property
    def prepared(self) -> bool:
        return self.picture is not None or self.clip is not None


def image_payload(data: bytes, name: str) -> tuple[bytes, str]:
    """(bytes to send, MIME type) for an image file's bytes: as is when servers read it as we do."""
    try:
        with quiet_pillow(), Image.open(io.BytesIO(data), formats=image_formats()) as image:
            kind = image.format
            orientation = pending_orientation(image)  # the turn load_image gives it
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            # a PNG's late eXIf chunk is not applied here (as load_image does not); a server might
            late_exif = kind == "PNG" and b"eXIf" in data
            if kind in SENT_AS_IS and orientation in (0, 1) and not has_alpha and not late_exif and image.mode in ("RGB", "L"):
                return data, SENT_AS_IS[kind]
            # a QOI by FFmpeg, as load_image decodes it: Pillow's decoder, in Python, took 11 s for 4 megapixels
            decoded = qoi_decoded(data, image) if ffmpeg_decodes(image) else image
            key = sixteen_bit_rgb_key(decoded)  # read from the tile, which loading empties
            decoded.load()
            if key is not None:  # a 16-bit RGB PNG's colour key: compared in 16 bits, as load_image does
                decoded = keyed_out(io.BytesIO(data), decoded, key)
            out = io.BytesIO()
            to_rgb(upright(decoded, orientation)).save(out, format="PNG")  # turned as load_image turns it
            return out.getvalue(), "image/png"
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for damaged files
        raise MediaError(f"cannot read image {name} ({shorten(str(e), 120)}); re-export it as PNG or JPEG") from None


def frames_as_jpeg(pixel_values) -> list[bytes]:
    """Normalised 448×448 tiles [N, 3, S, S] back to 8-bit pictures, as JPEG (exact inverse of the
    normalisation: the tiles were made from 8-bit pixels, so rounding restores them)."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    out = []
    for tile in pixel_values.numpy():
        rgb = np.clip(np.rint((tile * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        out.append(buf.getvalue())
    return out

