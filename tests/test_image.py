"""Dynamic tiling: grids, tile counts and pixels against plain reimplementations; bad files."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from media_helpers import (
    heic_photo,
    jpeg_with_empty_scans,
    png_with_declared_size,
    png_with_exif_after_pixels,
    reference_normalize,
    reference_tiles,
    textured_rgb,
    tiled_tiff,
    write_numbered_video,
)
from PIL import Image

from internvl_chat.errors import MediaError
from internvl_chat.media import image as media_image
from internvl_chat.media import image_headers
from internvl_chat.media.image import (
    candidate_grids,
    choose_grid,
    count_tiles,
    load_image,
    normalize_tiles,
    probe_image,
    tile_image,
    to_rgb,
)
from internvl_chat.media.video import probe_video


def expected_grid(width: int, height: int, max_tiles: int, size: int = 448) -> tuple[int, int]:
    """The rule restated without a scan: among the grids at the least aspect distance, the
    smallest one wins unless the image has more than half the pixels of a larger one."""
    aspect = width / height
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles]
    distance = {g: abs(aspect - g[0] / g[1]) for g in grids}
    least = min(distance.values())
    tied = sorted((g for g in grids if distance[g] == least), key=lambda g: g[0] * g[1])
    chosen = tied[0]
    for cols, rows in tied[1:]:
        if width * height > 0.5 * size * size * cols * rows:
            chosen = (cols, rows)
    return chosen


def expected_count(width: int, height: int, max_tiles: int, thumbnail: bool = True, size: int = 448) -> int:
    cols, rows = expected_grid(width, height, max_tiles, size)
    return cols * rows + (1 if thumbnail and cols * rows > 1 else 0)


SIZES = [
    (448, 448), (1000, 1000), (800, 600), (1920, 1080), (300, 1200),  # SPEC examples
    (1, 1), (7, 13), (13, 7), (10, 7), (449, 448), (448, 449),
    (633, 633), (634, 634), (950, 950), (951, 951),  # square: 1 → 4 → 9 tiles as the area grows
    (896, 448), (897, 448), (1400, 700), (1344, 448), (448, 896),  # 2:1 ties between (2,1) and (4,2)
    (896, 1008), (897, 1008),  # area exactly at the (3,3) threshold, and one pixel past it
    (300, 200), (600, 400), (900, 600),  # 3:2, the midpoint of 1 and 2 when max_tiles is 4
    (4000, 3000), (3000, 4000), (1080, 1920), (640, 480), (1280, 720), (720, 1280),
    (100, 3000), (3000, 100), (5000, 10), (10, 5000), (512, 384), (1024, 768), (2048, 512),
    (333, 777), (1234, 567), (4096, 4096), (1366, 768), (2560, 1080), (32, 36),
]


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 9, 12, 24])
def test_grid_and_count_match_the_restated_rule(max_tiles):
    for width, height in SIZES:
        assert choose_grid(width, height, max_tiles) == expected_grid(width, height, max_tiles), (width, height)
        assert count_tiles(width, height, max_tiles) == expected_count(width, height, max_tiles), (width, height)
        assert count_tiles(width, height, max_tiles, use_thumbnail=False) == expected_count(
            width, height, max_tiles, thumbnail=False
        )


def test_grid_with_another_tile_size():
    for width, height in SIZES:
        assert choose_grid(width, height, 12, image_size=16) == expected_grid(width, height, 12, size=16)


def test_spec_examples():
    assert [count_tiles(w, h) for w, h in [(448, 448), (1000, 1000), (800, 600), (1920, 1080), (300, 1200)]] == [
        1, 10, 13, 9, 5,
    ]
    assert choose_grid(1920, 1080) == (4, 2)
    assert choose_grid(800, 600) == (4, 3)
    assert choose_grid(300, 1200) == (1, 4)


def test_tie_rule_hand_computed():
    # 2:1 ties (2,1) with (4,2); (4,2) needs more than 0.5·448²·8 = 802,816 pixels
    assert choose_grid(896, 448) == (2, 1)  # 401,408 pixels
    assert choose_grid(1400, 700) == (4, 2)  # 980,000 pixels
    # aspect 8:9 ties (1,1), (2,2), (3,3); 896·1008 = 903,168 = 0.5·448²·9 exactly: not more, so (2,2)
    assert choose_grid(896, 1008) == (2, 2)
    assert choose_grid(897, 1008) == (3, 3)
    # with at most 4 tiles, 3:2 is as far from 1 as from 2: (1,1), then (2,1) past 448², then (2,2) past 2·448²
    assert [choose_grid(w, h, 4) for w, h in [(300, 200), (600, 400), (900, 600)]] == [(1, 1), (2, 1), (2, 2)]


def test_candidate_order_is_the_published_set_order():
    for low, high in [(1, 12), (1, 6), (2, 2), (3, 12), (1, 40)]:
        published = set(
            (i, j) for n in range(low, high + 1) for i in range(1, n + 1) for j in range(1, n + 1) if low <= i * j <= high
        )
        assert list(candidate_grids(low, high)) == sorted(published, key=lambda g: g[0] * g[1])


def test_min_tiles_ties_follow_set_order():
    # with exactly 2 tiles, 5:4 is as far from 1:2 as from 2:1; the set lists (1, 2) first
    assert list(candidate_grids(2, 2)) == [(1, 2), (2, 1)]
    assert choose_grid(5, 4, max_tiles=2, min_tiles=2) == (1, 2)  # too few pixels to switch
    assert choose_grid(1500, 1200, max_tiles=2, min_tiles=2) == (2, 1)


# ---------------------------------------------------------------- pixels


@pytest.mark.parametrize(
    "width, height, max_tiles, thumbnail, size",
    [
        (800, 600, 12, True, 448),
        (300, 1200, 12, True, 448),
        (1000, 1000, 12, True, 448),
        (448, 448, 12, True, 448),
        (37, 23, 12, True, 448),
        (1920, 1080, 6, False, 448),
        (900, 600, 4, True, 448),
        (640, 480, 1, True, 448),
        (500, 260, 12, True, 224),
    ],
)
def test_tiles_match_plain_pil_numpy(tmp_path, width, height, max_tiles, thumbnail, size):
    rgb = textured_rgb(width, height, seed=width * 7 + height)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    result = load_image(path, max_tiles=max_tiles, use_thumbnail=thumbnail, image_size=size)
    cols, rows = expected_grid(width, height, max_tiles, size)
    want = reference_tiles(rgb, cols, rows, thumbnail, size)
    assert result.pixel_values.dtype == torch.float32
    assert tuple(result.pixel_values.shape) == want.shape
    np.testing.assert_allclose(result.pixel_values.numpy(), want, atol=2e-6, rtol=0)
    assert result.grid == (cols, rows)
    assert result.size == (width, height)
    assert result.num_tiles == expected_count(width, height, max_tiles, thumbnail, size)
    assert result.path == path


def test_tile_image_and_normalize_tiles_directly():
    rgb = textured_rgb(700, 300, seed=3)
    tiles = tile_image(Image.fromarray(rgb), max_tiles=12, use_thumbnail=True, image_size=448)
    cols, rows = expected_grid(700, 300, 12)
    assert len(tiles) == cols * rows + 1
    assert all(t.size == (448, 448) for t in tiles)
    np.testing.assert_allclose(normalize_tiles(tiles).numpy(), reference_tiles(rgb, cols, rows, True, 448), atol=2e-6)
    # a tile of another size is resized to S×S first
    small = Image.fromarray(rgb[:50, :80])
    want = reference_normalize(np.asarray(small.resize((448, 448), Image.BICUBIC)))
    np.testing.assert_allclose(normalize_tiles([small])[0].numpy(), want, atol=2e-6)


def test_normalisation_constants_on_known_pixels(tmp_path):
    # black, white and a grey: (v/255 − mean)/std computed by hand for the red channel
    for value in (0, 255, 100):
        path = tmp_path / f"flat{value}.png"
        Image.new("RGB", (448, 448), (value, value, value)).save(path)
        red = load_image(path).pixel_values[0, 0]
        assert red.min().item() == pytest.approx((value / 255 - 0.485) / 0.229, abs=1e-6)
        assert red.max().item() == pytest.approx((value / 255 - 0.485) / 0.229, abs=1e-6)


# ---------------------------------------------------------------- EXIF and colour modes


@pytest.mark.parametrize(
    "orientation, to_display",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored 90° counter-clockwise: turn clockwise to show
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, to_display):
    stored = textured_rgb(900, 500, seed=orientation)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(path).convert("RGB"))  # Pillow does not rotate by itself
    display = np.ascontiguousarray(to_display(decoded))
    height, width = display.shape[:2]

    assert probe_image(path) == (width, height)
    result = load_image(path)
    assert result.size == (width, height)
    cols, rows = expected_grid(width, height, 12)
    np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(display, cols, rows, True, 448), atol=2e-6)
    assert result.num_tiles == count_tiles(*probe_image(path))


@pytest.mark.parametrize("kind", ["TIFF", "PNG with eXIf after the pixels"])
def test_probe_and_decode_turn_alike_where_pillow_reads_the_orientation_itself(tmp_path, kind):
    """350×100 is 4 tiles and 100×350 is 5: a probe and a decode that turned the picture differently
    made its turn's tokens and tiles disagree, and it could never be sent ("changed after it was
    attached; attach it again", each time). Pillow opens a TIFF turned already (the probe turned it a
    second time), and reads a PNG's late eXIf chunk only with the pixels (the probe never saw it)."""
    stored = textured_rgb(350, 100, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6
    if kind == "TIFF":
        path = tmp_path / "scan.tif"
        Image.fromarray(stored).save(path, exif=exif.tobytes())
        display = np.ascontiguousarray(np.rot90(stored, -1))
    else:
        path = tmp_path / "late.png"
        path.write_bytes(png_with_exif_after_pixels(stored, 6))
        display = stored  # probed as stored (the documented exception), so decoded as stored
    _assert_probed_and_loaded_as(path, display)


_TO_DISPLAY = {  # EXIF orientation → the stored pixels as shown (numpy, independent of Pillow's transposes)
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_shown_upright_for_every_orientation(tmp_path, orientation):
    """Pillow turns a TIFF itself as it loads it, for every orientation; the mirrored and upside-down
    ones (2, 3, 4), whose size does not change, were turned a second time: the scan went in as stored."""
    stored = textured_rgb(350, 100, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "scan.tif"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    _assert_probed_and_loaded_as(path, np.ascontiguousarray(_TO_DISPLAY[orientation](stored)))


def _assert_probed_and_loaded_as(path, display: np.ndarray) -> None:
    """The probe gives `display`'s size, and the tiles are those of `display` (the upright picture)."""
    height, width = display.shape[:2]
    assert probe_image(path) == (width, height)
    result = load_image(path)
    assert result.size == (width, height) and result.num_tiles == count_tiles(width, height)
    cols, rows = expected_grid(width, height, 12)
    np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(display, cols, rows, True, 448), atol=2e-6)


def _exif_with_orientation_entry(field_type: int, count: int, value: bytes, extra: bytes = b"") -> bytes:
    """Raw big-endian EXIF holding one orientation entry of any type (`extra`: data after the IFD)."""
    import struct

    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, field_type, count) + value + b"\0\0\0\0"
    return b"Exif\0\0MM\0*\0\0\0\x08" + ifd + extra


@pytest.mark.parametrize(
    "name, entry, turned",
    [
        ("text '6'", (2, 2, b"6\0\0\0"), False),  # ASCII: exif_transpose's lookup finds no turn for "6"
        ("rational 13/2", (5, 1, b"\0\0\0\x1a", b"\0\0\0\x0d\0\0\0\x02"), False),  # int() made it 6
        ("rational 6/1", (5, 1, b"\0\0\0\x1a", b"\0\0\0\x06\0\0\0\x01"), True),
    ],
)
def test_a_malformed_orientation_is_probed_and_decoded_alike(tmp_path, name, entry, turned):
    """223×100 is 3 tiles and 100×223 is 11. An orientation stored as the text "6" was read as 6 by
    the probe (turned: 11 tiles) and ignored by the decode (3 tiles): the picture could never be
    sent ("changed after it was attached; attach it again", each time)."""
    stored = textured_rgb(223, 100, seed=9)
    path = tmp_path / "odd_exif.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=_exif_with_orientation_entry(*entry))
    decoded = np.asarray(Image.open(path).convert("RGB"))
    display = np.ascontiguousarray(np.rot90(decoded, -1) if turned else decoded)
    _assert_probed_and_loaded_as(path, display)


def test_transparent_pixels_become_white_and_opaque_ones_stay(tmp_path):
    rgba = np.zeros((448, 448, 4), np.uint8)
    rgba[..., :3] = textured_rgb(448, 448, seed=9)
    rgba[:, :224, 3] = 255  # left half opaque
    rgba[:, 224:, 3] = 0  # right half transparent (colour underneath must not show)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = load_image(path).pixel_values[0].numpy()
    want = reference_normalize(np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8))
    np.testing.assert_allclose(got[:, :, :200], want[:, :, :200], atol=2e-6)
    np.testing.assert_allclose(got[:, :, 250:], want[:, :, 250:], atol=2e-6)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_other_colour_modes_convert_like_pillow(tmp_path, mode):
    source = Image.fromarray(textured_rgb(300, 200, seed=5))
    image = source.convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    image.save(path)
    expected_rgb = np.asarray(Image.open(path).convert("RGB"))  # LA here is fully opaque
    result = load_image(path)
    cols, rows = expected_grid(300, 200, 12)
    np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(expected_rgb, cols, rows, True, 448), atol=2e-6)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.zeros((448, 448), np.uint16)
    values[:, 150:300] = 32896  # 128 · 257
    values[:, 300:] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    red = load_image(path).pixel_values[0, 0].numpy()
    for column, byte in [(50, 0), (220, 128), (400, 255)]:
        assert red[200, column] == pytest.approx((byte / 255 - 0.485) / 0.229, abs=1e-5)


def test_a_transparent_grey_of_a_sixteen_bit_png_becomes_white_as_other_transparency_does(tmp_path):
    """to_rgb scaled a 16-bit grey PNG to 8 bits and dropped its tRNS colour with the mode: its
    transparent background went in as whatever grey hid under it, where every other transparent
    picture's turns white. Only the exact value is transparent: its neighbour, the same 8-bit grey, is not."""
    values = np.zeros((448, 448), np.uint16)
    values[:, 150:300] = 32896  # 128 · 257, marked transparent
    values[:, 300:] = 32897  # rounds to 128 too, but opaque
    path = tmp_path / "deep_transparent.png"
    Image.fromarray(values).save(path, transparency=32896)
    red = load_image(path).pixel_values[0, 0].numpy()
    for column, byte in [(50, 0), (220, 255), (400, 128)]:
        assert red[200, column] == pytest.approx((byte / 255 - 0.485) / 0.229, abs=1e-5)


def test_a_sixteen_bit_grey_with_a_transparent_value_is_converted_strip_by_strip():
    """to_rgb converts in strips so that memory stays near the result: the transparent value's alpha was
    kept for the whole picture, stacked with its grey into a third copy and made an LA image of 4 bytes a
    pixel (1.2 GB more for a 179-megapixel PNG of a few hundred KB). Measured in a process of its own:
    tracemalloc counts every thread's allocations (pytest-xdist's message thread, a server fixture's),
    and finalizers of earlier tests' garbage run in the window too, where the margin is about 100 KB."""
    import json
    import textwrap

    script = textwrap.dedent("""
        import json, tracemalloc
        import numpy as np
        from PIL import Image
        from internvl_chat.media import image as media_image
        media_image.STRIP_PIXELS = 1 << 14
        values = np.full((1024, 1024), 32896, np.uint16)
        values[:, 512:] = 1000
        picture = Image.fromarray(values)
        picture.info["transparency"] = 32896
        tracemalloc.start()
        rgb = media_image.to_rgb(picture)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pixels = np.asarray(rgb)
        print(json.dumps(dict(peak=peak, transparent=pixels[0, 0].tolist(), opaque=pixels[0, 600].tolist())))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["transparent"] == [255] * 3 and got["opaque"] == [4] * 3, got
    assert got["peak"] < 1.5 * 1024 * 1024, got  # the 8-bit grey (1 byte a pixel) and a strip's temporaries


@pytest.mark.parametrize("interlace", [0, 1])
def test_a_transparent_colour_of_a_sixteen_bit_rgb_png_becomes_white_as_other_transparency_does(tmp_path, interlace):
    """Pillow reads a 16-bit RGB PNG as 8-bit RGB and keeps its tRNS colour in 16 bits: compared with
    8-bit pixels it matched none (a key of (0, 0, 0) would match every pixel of values 0…255), and the
    transparent background went in as the grey hidden under it. Only the exact colour is transparent."""
    key, neighbour, other = (0x8080, 0x8080, 0x8080), (0x8081, 0x8080, 0x8080), (0x1234, 0xABCD, 0x00FF)
    row = b"\0" + b"".join(struct.pack(">HHH", *colour) for colour in [other] * 6 + [key] * 6 + [neighbour] * 6)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 18, 10, 16, 2, 0, 0, interlace))
           + _png_chunk(b"tRNS", struct.pack(">HHH", *key)) + _png_chunk(b"IDAT", zlib.compress(row * 10 if not interlace else _adam7(row, 10)))
           + _png_chunk(b"IEND", b""))  # fmt: skip
    path = tmp_path / "deep_key.png"
    path.write_bytes(png)
    pixels = np.asarray(media_image._decode(path))
    assert pixels.shape == (10, 18, 3)
    assert (pixels[:, :6] == (0x12, 0xAB, 0x00)).all() and (pixels[:, 6:12] == 255).all() and (pixels[:, 12:] == 128).all()


def test_a_transparent_colour_of_an_eight_bit_rgb_png_becomes_white_as_other_transparency_does(tmp_path):
    """An 8-bit RGB PNG's tRNS colour key (Pillow: mode RGB, info["transparency"] = (r, g, b)) made
    no pixel white: to_rgb returned any RGB image as it was, while a 16-bit one's key, a grey's key
    and a palette's transparency were all composited over white (as transformers' convert_to_rgb,
    the -hf processor's conversion, does for each). Only the exact colour is transparent."""
    rgb = np.zeros((10, 18, 3), np.uint8)
    rgb[:, :6] = (0x12, 0xAB, 0x00)
    rgb[:, 6:12] = (0x80, 0x80, 0x80)  # the key
    rgb[:, 12:] = (0x81, 0x80, 0x80)  # one value off: opaque
    path = tmp_path / "key.png"
    Image.fromarray(rgb).save(path, transparency=(0x80, 0x80, 0x80))
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.info["transparency"] == (0x80, 0x80, 0x80)  # the case tested
    pixels = np.asarray(media_image._decode(path))
    assert (pixels[:, :6] == (0x12, 0xAB, 0x00)).all() and (pixels[:, 6:12] == 255).all() and (pixels[:, 12:] == (0x81, 0x80, 0x80)).all()
    white = rgb.copy()
    white[:, 6:12] = 255
    cols, rows = expected_grid(18, 10, 12)
    np.testing.assert_allclose(load_image(path).pixel_values.numpy(), reference_tiles(white, cols, rows, True, 448), atol=2e-6)


def _adam7(row: bytes, height: int) -> bytes:
    """The scanlines of an interlaced (Adam7) PNG all of whose rows are `row` (its filter byte 0, then
    pixels of 6 bytes)."""
    pixels = [row[1 + 6 * x : 7 + 6 * x] for x in range((len(row) - 1) // 6)]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    out = b""
    for x0, y0, dx, dy in passes:
        columns = pixels[x0::dx]
        if columns:
            out += (b"\0" + b"".join(columns)) * len(range(y0, height, dy))
    return out


# ---------------------------------------------------------------- bad input


def _assert_one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text and text
    for word in words:
        assert word in text, text


def _assert_both_refuse(path: Path, *words: str) -> None:
    """probe_image (the attach line) and load_image refuse `path` alike, in one line holding `words`."""
    for call in (probe_image, load_image):
        with pytest.raises(MediaError) as err:
            call(path)
        _assert_one_line(err, *words)


def test_missing_file(tmp_path):
    with pytest.raises(MediaError) as err:
        load_image(tmp_path / "nope.jpg")
    _assert_one_line(err, "nope.jpg", "does not exist")
    with pytest.raises(MediaError):
        probe_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize(
    "content, what, to_do",
    [
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "is text, not an image", "a web page saved"),
        # a web page's icons are inline SVG: the page is no drawing, and converting it to PNG draws the error page
        (b'<!DOCTYPE html>\n<html><body><a href="/"><svg viewBox="0 0 16 16"><path d="M8 0"/></svg></a>404</body></html>',
         "is text, not an image", "a web page saved"),
        (b"<!-- drawn by hand -->\n<svg xmlns='http://www.w3.org/2000/svg'><text>&lt;html&gt;</text></svg>", "is an SVG drawing", "convert it to PNG"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "is an SVG drawing", "convert it to PNG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "is a PDF document, not an image", "export its page as PNG"),
        (b"PK\x03\x04" + bytes(40), "is a zip archive, not an image", "extract the picture"),
    ],
)
def test_a_file_that_is_no_picture_is_named_for_what_it_is(tmp_path, content, what, to_do):
    """An error page or an SVG saved under a picture's name was called "not an image format that can
    be read (or it is damaged)": a user re-downloaded the same page, or looked for damage."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    _assert_both_refuse(path, "photo.jpg", what, to_do)


def test_binary_data_of_no_known_kind_is_not_called_text(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(bytes(range(1, 256)) * 4)  # no NUL byte, but not UTF-8
    _assert_both_refuse(path, "noise.png", "not an image format that can be read (or it is damaged)")


def test_directory(tmp_path):
    with pytest.raises(MediaError) as err:
        load_image(tmp_path)
    _assert_one_line(err, "folder")


@pytest.mark.parametrize("content", [b"this is not an image\n", b"\0"])  # an empty one: test_an_empty_file_is_named_empty
def test_not_an_image(tmp_path, content):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "fake.jpg", "not an image")
    with pytest.raises(MediaError):
        probe_image(path)


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".png", "PNG"), (".qoi", "QOI")])
def test_truncated_file(tmp_path, suffix, fmt):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(textured_rgb(400, 300, seed=1)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    assert probe_image(path) == (400, 300)  # the header alone is intact
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "truncated or corrupt")


def test_corrupt_png_data(tmp_path):
    path = tmp_path / "bad.png"
    Image.fromarray(textured_rgb(200, 200, seed=2)).save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "bad.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_declared_size(20000, 20000))
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "decompression bomb")
    with pytest.raises(MediaError):
        probe_image(path)
    # our limit holds even when Pillow's own is switched off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path.write_bytes(png_with_declared_size(15000, 12000))  # 180M pixels, just over 178,956,970
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "decompression bomb")


def test_large_but_allowed_header_is_probed_without_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_with_declared_size(10000, 10000))  # 100M pixels: allowed, data missing
    assert probe_image(path) == (10000, 10000)  # would fail if probing decoded the pixels
    assert count_tiles(*probe_image(path)) == 10
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "truncated or corrupt")


def test_an_empty_file_is_named_empty(tmp_path):
    """A 0-byte picture (an unfinished download) was "not an image format that can be read (or it is
    damaged)": it says what it is. Videos share the check (tests/test_video.py's bad files)."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"")
    _assert_both_refuse(path, f"cannot read image {path}: the file is empty (0 bytes; an unfinished download or copy?)")


def test_zero_size_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(png_with_declared_size(0, 10))
    with pytest.raises(MediaError):
        load_image(path)
    with pytest.raises(MediaError) as err:
        choose_grid(0, 10)
    _assert_one_line(err, "non-zero size")
    with pytest.raises(MediaError):
        count_tiles(10, 0)


def test_a_side_too_long_for_pillows_filter_is_still_tiled():
    """Pillow refuses (a MemoryError, whatever the free memory) to shrink a side of more than ~67
    million pixels with its bicubic filter: a 1×70,000,000 picture, within the pixel limit, was a
    traceback when the message was sent. It is shrunk by box averaging first."""
    tiles = tile_image(Image.new("L", (1, 70_000_000), 200))
    assert len(tiles) == 13 and all(t.size == (448, 448) for t in tiles)
    assert all(np.asarray(t).min() == np.asarray(t).max() == 200 for t in tiles)


def test_running_out_of_memory_while_tiling_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (900, 300)).save(path)

    def no_memory(image, size):
        raise MemoryError

    monkeypatch.setattr(media_image, "_resize", no_memory)
    with pytest.raises(MediaError) as err:
        load_image(path)
    _assert_one_line(err, "not enough memory to resize", str(path))


def test_bad_tile_limits(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(path)
    for bad in (0, -3):
        with pytest.raises(MediaError) as err:
            load_image(path, max_tiles=bad)
        _assert_one_line(err, "max_tiles")
        with pytest.raises(MediaError):
            count_tiles(100, 100, max_tiles=bad)
    with pytest.raises(MediaError):
        choose_grid(100, 100, max_tiles=4, min_tiles=5)
    for bad in (65, 10**6):  # the candidate search is cubic in the limit: never hang on a huge one
        with pytest.raises(MediaError):
            count_tiles(100, 100, max_tiles=bad)
    with pytest.raises(MediaError) as err:
        load_image(path, max_tiles=4, min_tiles=5)
    _assert_one_line(err, "min_tiles")


def test_escape_characters_in_a_path_are_shown_not_sent(tmp_path):
    path = tmp_path / "bad\x1b[2Jname.png"
    path.write_bytes(b"not an image")
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert "\x1b" not in str(err.value) and "bad\\e[2Jname.png" in str(err.value)


# ---------------------------------------------------------------- a minimum number of tiles


def published_grid(width: int, height: int, min_tiles: int, max_tiles: int, size: int = 448) -> tuple[int, int]:
    """The published scan over the published candidate order (built here as the published code
    builds it: a set of (i, j), stable-sorted by i·j)."""
    candidates = sorted(
        set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles),
        key=lambda g: g[0] * g[1],
    )  # fmt: skip
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


@pytest.mark.parametrize("min_tiles, max_tiles", [(1, 12), (2, 2), (2, 6), (4, 12), (6, 12), (12, 12), (3, 24)])
def test_min_tiles_grid_and_count(min_tiles, max_tiles):
    for width, height in SIZES:
        cols, rows = published_grid(width, height, min_tiles, max_tiles)
        assert min_tiles <= cols * rows <= max_tiles
        assert choose_grid(width, height, max_tiles, min_tiles) == (cols, rows), (width, height)
        expected = cols * rows + (1 if cols * rows > 1 else 0)
        assert count_tiles(width, height, max_tiles, min_tiles=min_tiles) == expected, (width, height)
        assert count_tiles(width, height, max_tiles, use_thumbnail=False, min_tiles=min_tiles) == cols * rows


def test_min_tiles_reach_the_pixels(tmp_path):
    rgb = textured_rgb(448, 448, seed=11)
    path = tmp_path / "square.png"
    Image.fromarray(rgb).save(path)
    assert load_image(path, max_tiles=12).num_tiles == 1
    result = load_image(path, max_tiles=12, min_tiles=4)  # a small square is cut 2×2 (+ thumbnail)
    assert result.grid == (2, 2) and result.num_tiles == 5 == count_tiles(448, 448, 12, min_tiles=4)
    np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(rgb, 2, 2, True, 448), atol=2e-6, rtol=0)


# ---------------------------------------------------------------- hostile files (red team)


def test_an_eps_file_named_jpg_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    # Pillow renders EPS by running Ghostscript on the file: a served data: URL could reach it
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or (_ for _ in ()).throw(OSError("ran")))
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 16)).save(path, "EPS")
    _assert_both_refuse(path, "is a PostScript (EPS) drawing, not an image", "convert it to PNG")
    assert ran == []


def _garbage_exif_jpeg(path):
    # a TIFF header whose first IFD claims 65535 entries that are not there
    Image.fromarray(textured_rgb(80, 60, seed=3)).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 100)
    return path


def test_garbage_exif_prints_no_warnings_and_keeps_the_image(tmp_path):
    # Pillow warned "Corrupt EXIF data" (two lines with its source path) on stderr for each look
    path = _garbage_exif_jpeg(tmp_path / "garbage_exif.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe_image(path) == (80, 60)
        result = load_image(path)
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(stored, *expected_grid(80, 60, 12), True, 448), atol=2e-6)


def _peak_mib_of(work) -> float:
    """The resident memory `work()` adds at its peak (Linux: VmHWM reset through clear_refs)."""
    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmHWM", "VmRSS")}

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
    except OSError:
        pytest.skip("cannot reset the peak resident size here")
    before = status()["VmRSS"]
    work()
    return (status()["VmHWM"] - before) / 1024


@pytest.mark.parametrize("mode", ["LA", "I;16"])
def test_converting_a_large_image_needs_little_more_than_its_rgb_result(mode):
    # whole-image float64 and RGBA temporaries took 15–25 bytes a pixel: gigabytes for a 64 KB
    # PNG declaring 170M pixels; strips keep it near the 3 bytes a pixel of the result
    width, height = 4000, 3000
    image = Image.new("LA", (width, height), (10, 200)) if mode == "LA" else Image.fromarray(np.full((height, width), 1234, np.uint16))
    image.load()
    peak = _peak_mib_of(lambda: to_rgb(image))
    assert peak < 8 * width * height / 2**20, f"{peak:.0f} MiB"


def test_conversion_strips_join_without_seams(monkeypatch):
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (97, 131, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (97, 131), dtype=np.uint16)
    want_alpha = np.asarray(Image.alpha_composite(Image.new("RGBA", (131, 97), "white"), Image.fromarray(rgba, "RGBA")).convert("RGB"))
    want_deep = np.repeat(np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    monkeypatch.setattr(media_image, "STRIP_PIXELS", 1000)  # 7 rows a strip, the last one shorter
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))), want_alpha)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(deep))), want_deep)


def test_a_video_given_as_an_image_says_to_attach_it_as_a_video(tmp_path):
    path = write_numbered_video(tmp_path / "clip.mp4", 3).rename(tmp_path / "clip.png")  # an MP4 whatever its name
    _assert_both_refuse(path, "is a video, not an image", "as a video")


def test_a_heic_photo_is_named_as_one_with_what_to_do(tmp_path):
    # its ftyp box made it "a video, not an image; attach it as a video", which then said it was cut short
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(heic_photo())
    for call in (probe_image, load_image):
        with pytest.raises(MediaError) as err:
            call(path)
        assert str(err.value) == f"{path} is a HEIC image, a format this installation cannot read; convert it to JPEG or PNG"


def test_a_folder_or_device_is_named_with_its_article(tmp_path):
    with pytest.raises(MediaError) as err:
        probe_image(tmp_path)
    _assert_one_line(err, "is a folder, not an image file")


def test_a_dangling_or_looping_link_is_called_a_link(tmp_path):
    # "does not exist" sent the user looking for a file that `ls` shows
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    for name in ("dangling.png", "a.png"):
        for call in (probe_image, load_image, probe_video):
            with pytest.raises(MediaError) as err:
                call(tmp_path / name)
            _assert_one_line(err, name, "is a link to a file that does not exist")


def test_a_tiff_whose_tiles_dwarf_the_picture_is_refused_before_decoding(tmp_path):
    """Each TIFF tile is decoded whole before it is cut to the picture: a 64×64 TIFF declaring
    8192×8192 tiles decoded 200 MB (a 16384² tile: 805 MB from 3 MB; a 64 MB request body could
    ask for gigabytes), none of it limited by the picture's pixel count."""
    bomb = tmp_path / "bomb.tif"
    bomb.write_bytes(tiled_tiff(64, 64, 8192, grey=None))
    _assert_both_refuse(bomb, "bomb.tif", "tiles of 67,108,864 pixels", "decompression bomb")
    # ordinary tiles, larger than the picture or not, still load
    for width, height, tile in ((300, 200, 256), (64, 64, 256)):
        path = tmp_path / f"tiled_{width}_{tile}.tif"
        path.write_bytes(tiled_tiff(width, height, tile, grey=77))
        assert probe_image(path) == (width, height)
        result = load_image(path)
        assert result.size == (width, height)
        np.testing.assert_allclose(result.pixel_values.numpy(), reference_tiles(np.full((height, width, 3), 77, np.uint8),
                                   *expected_grid(width, height, 12), True, 448), atol=2e-6)  # fmt: skip


@pytest.mark.parametrize("tag", [322, 323])  # TileWidth, TileLength
def test_a_tiff_tile_size_of_several_values_raises_no_python_warning(tmp_path, tag):
    """The tile size is read after the picture is opened, where Pillow's warning about a tag of
    several values ("Metadata Warning, tag 322 had too many entries: 5, expected 1") was not
    silenced: two lines of Pillow's source on the terminal (found by tests/test_fuzz_media.py)."""
    data = bytearray(tiled_tiff(96, 40, 16))
    entries = struct.unpack("<H", data[8:10])[0]
    at = next(10 + 12 * k for k in range(entries) if struct.unpack("<H", data[10 + 12 * k : 12 + 12 * k])[0] == tag)
    data[at + 4 : at + 8] = struct.pack("<I", 5)  # the tag's count: five values where one belongs
    path = tmp_path / "tiles.tif"
    path.write_bytes(bytes(data))
    for call in (probe_image, load_image):
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            try:
                call(path)
            except MediaError as e:
                assert "\n" not in str(e)
        assert [str(w.message) for w in raised if w.category is not ResourceWarning] == []


def test_pillows_log_record_about_a_damaged_tiff_stays_off_stderr(tmp_path):
    """Pillow logs some damage as an ERROR record ("More samples per pixel than can be decoded:
    51462"), and with no logging set up (the app sets none) Python printed it to stderr itself, a
    line before our one-line error (found by tests/test_fuzz_media.py). In a process of its own:
    pytest's log capture would hide what a bare process prints."""
    data = bytearray(tiled_tiff(96, 40, 16))
    entries = struct.unpack("<H", data[8:10])[0]
    at = next(10 + 12 * k for k in range(entries) if struct.unpack("<H", data[10 + 12 * k : 12 + 12 * k])[0] == 277)
    data[at + 8 : at + 10] = struct.pack("<H", 51462)  # SamplesPerPixel
    path = tmp_path / "samples.tif"
    path.write_bytes(bytes(data))
    code = ("import sys; from internvl_chat.errors import MediaError; from internvl_chat.media.image import load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept MediaError as e:\n    print(e)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "samples.tif" in run.stdout and len(run.stdout.splitlines()) == 1, run.stdout


def _grey_png(width: int, height: int, grey: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" + bytes([grey]) * width) * height
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")  # fmt: skip


def test_a_side_too_long_for_any_picture_is_refused_at_the_header(tmp_path):
    """Pillow spends ~20 bytes a pixel on a picture one pixel wide (a row pointer each): a 194 KB
    PNG of 1×100,000,000, within the pixel limit, took 2.2 GB and 19 s to be tiled."""
    for width, height in ((1, media_image.MAX_SIDE + 1), (media_image.MAX_SIDE + 1, 1)):
        path = tmp_path / f"strip_{width}x{height}.png"
        path.write_bytes(png_with_declared_size(width, height))
        _assert_both_refuse(path, path.name, "a side longer than 1,048,576", "crop or downscale")
    path = tmp_path / "longest.png"
    path.write_bytes(_grey_png(1, media_image.MAX_SIDE, 90))
    result = load_image(path)
    assert result.size == (1, media_image.MAX_SIDE) and result.num_tiles == 13


def _icon(picture: bytes) -> bytes:
    """An ICO file of one entry (its directory says 256×256) holding `picture`, a PNG or a BMP without its file header."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(picture), 22) + picture


def _icon_bmp(width: int, height: int) -> bytes:
    """An icon's BMP header (its height counts the transparency mask's rows too), followed by no pixels."""
    return struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0)


def test_an_icon_holding_a_bomb_is_refused_before_its_picture_is_decoded(tmp_path, monkeypatch):
    """Pillow decodes an icon's picture as it opens the file, whatever size that PNG or BMP declares
    (its directory says 256×256 at most), within only Pillow's own pixel limit: a 95 KB icon holding
    a PNG of 1×50,000,000 took 655 MB before the side check refused it. The pictures here have no
    pixel data: decoded, they said "truncated" instead of what is wrong with them."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller that changed Pillow's limit does not change ours
    cases = {
        "long_png.ico": (_icon(png_with_declared_size(1, media_image.MAX_SIDE + 1)), "a side longer than 1,048,576"),
        "long_bmp.ico": (_icon(_icon_bmp(media_image.MAX_SIDE + 1, 1)), "a side longer than 1,048,576"),
        "large_png.ico": (_icon(png_with_declared_size(15000, 12000)), "decompression bombs"),  # 180M pixels
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _assert_both_refuse(path, name, words)


def test_an_icon_of_a_large_picture_within_the_limits_is_read_at_its_size(tmp_path):
    path = tmp_path / "big.ico"
    path.write_bytes(_icon(_grey_png(600, 300, 90)))
    assert probe_image(path) == (600, 300)
    result = load_image(path)
    assert result.size == (600, 300) and result.grid == (2, 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_chunks(png: bytes, chunks: bytes) -> bytes:
    """`png` with `chunks` after its header (IHDR), before its pixels."""
    return png[:33] + chunks + png[33:]


def test_a_header_of_countless_segments_chunks_or_blocks_is_refused_before_pillow_reads_it(tmp_path, monkeypatch):
    """Pillow reads a header a segment, chunk or block at a time in Python and keeps most of them: a
    48 MB JPEG of 12 million empty segments took 14 s and 1.8 GB to open, a 10 MB GIF of 5 million
    comment blocks 650 MB, a PNG's unknown chunks about 10 times their size (after the pixels too)."""
    pixels = Image.new("RGB", (16, 16), (10, 20, 30))
    jpeg, png, gif = (_saved(pixels if kind != "GIF" else pixels.convert("P"), kind) for kind in ("JPEG", "PNG", "GIF"))
    monkeypatch.setattr(image_headers, "MAX_PNG_CHUNKS", 1000)  # a million are allowed: fewer make the same point
    frame = gif.index(b"\x2c")  # the first frame, after the global colour table
    limit = image_headers.MAX_JPEG_SEGMENTS
    cases = {
        "segments.jpg": (jpeg[:2] + b"\xff\xe5\x00\x02" * (limit + 1) + jpeg[2:], "a JPEG of more than 65,536 segments"),
        "fill.jpg": (jpeg[:2] + b"\xff" * (limit + 2) + jpeg[2:], "a JPEG of more than 65,536 segments or fill bytes"),
        "private.png": (_with_chunks(png, _png_chunk(b"abCd", b"") * 1001), "a PNG of more than 1,000 chunks"),
        "text.png": (_with_chunks(png, b"".join(_png_chunk(b"tEXt", b"k%d\0" % i) for i in range(1001))), "more than 1,000 chunks"),
        "private.ico": (_icon(_with_chunks(png, _png_chunk(b"abCd", b"") * 1001)), "an icon holding a PNG of more than 1,000 chunks"),
        "comments.gif": (gif[:frame] + b"\x21\xfe" + b"\x01a" * (limit + 1) + b"\0" + gif[frame:], "a GIF of more than 65,536"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _assert_both_refuse(path, name, words, "refused as a possible decompression bomb; re-save it")
    # at the limits they are pictures like any other
    at_limit = {
        "segments.jpg": jpeg[:2] + b"\xff\xe5\x00\x02" * (limit - 16) + jpeg[2:],
        "private.png": _with_chunks(png, _png_chunk(b"abCd", b"") * (1000 - 4)),  # IHDR, IDAT, IEND besides
        "private.ico": _icon(_with_chunks(png, _png_chunk(b"abCd", b"") * (1000 - 4))),
        "comments.gif": gif[:frame] + b"\x21\xfe" + b"\x01a" * (limit - 8) + b"\0" + gif[frame:],
    }
    for name, data in at_limit.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert probe_image(path) == (16, 16), name
        assert load_image(path).size == (16, 16), name


def _tiff_of_strips(strips: int, big: bool = False) -> bytes:
    """A 16×16 grey TIFF (or BigTIFF) whose StripOffsets list `strips` strips, all the same 256 bytes
    (the first 16 rows of one pixel each are enough for Pillow: each strip is a row)."""
    word, count_format, entry_format = ("Q", "Q", "<HHQQ") if big else ("I", "H", "<HHII")
    pixels, header = bytes(range(256)), 16 if big else 8
    offsets_at = header + len(pixels)
    counts_at = offsets_at + strips * struct.calcsize(word)
    directory_at = counts_at + strips * struct.calcsize(word)
    long_type = 16 if big else 4  # LONG8, LONG
    tags = [(256, 3, 1, 16), (257, 3, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, long_type, strips, offsets_at),
            (277, 3, 1, 1), (278, 3, 1, 1), (279, long_type, strips, counts_at)]  # fmt: skip
    start = b"II+\0" + struct.pack("<HHQ", 8, 0, directory_at) if big else b"II*\0" + struct.pack("<I", directory_at)
    offsets = struct.pack(f"<{strips}{word}", *(header + 16 * (k % 16) for k in range(strips)))
    counts = struct.pack(f"<{word}", 16) * strips
    directory = struct.pack(f"<{count_format}", len(tags)) + b"".join(struct.pack(entry_format, *tag) for tag in tags)
    return start + pixels + offsets + counts + directory + struct.pack(f"<{word}", 0)


def test_a_tiff_listing_far_more_strips_than_a_picture_has_is_refused_before_pillow_reads_them(tmp_path, monkeypatch):
    """Pillow turns a TIFF's strip (or tile) offsets into Python values as it opens the file, and
    decodes strip by strip: a 64 MB TIFF of 16×16 pixels listing 8 million strips took 2.2 GB and
    14 s to open and a minute to decode. No picture within MAX_SIDE needs more than MAX_SIDE strips."""
    monkeypatch.setattr(image_headers, "MAX_TIFF_VALUES", 100)  # a million are allowed: fewer make the same point
    for big in (False, True):
        path = tmp_path / f"strips{'_big' if big else ''}.tif"
        path.write_bytes(_tiff_of_strips(101, big))
        _assert_both_refuse(path, path.name, "a TIFF whose StripOffsets tag lists 101 values", "re-save it")
        path.write_bytes(_tiff_of_strips(100, big))
        assert probe_image(path) == (16, 16)
        assert load_image(path).size == (16, 16)
    path = tmp_path / "far.tif"  # a BigTIFF whose directory lies past 2^63 (no file reaches there) is Pillow's to refuse
    path.write_bytes(b"II+\0" + struct.pack("<HHQ", 8, 0, 1 << 63) + bytes(16))
    _assert_both_refuse(path, path.name)


def test_a_ppm_whose_header_runs_on_is_refused_before_pillow_reads_it_a_byte_at_a_time(tmp_path):
    """Pillow reads a PPM's header a byte at a time in Python, blanks and comments included: 24 MB of
    comment took 5 s to open (a request body's worth, a few seconds more)."""
    pixels = _saved(Image.new("RGB", (16, 16), (10, 20, 30)), "PPM")
    assert pixels.startswith(b"P6\n16 16\n255\n")
    long = 1 << 16  # PPM_HEADER_BYTES
    cases = {
        "comment.ppm": b"P6\n#" + b"x" * long + b"\n" + pixels[3:],
        "blanks.ppm": b"P6" + b" " * long + pixels[2:],
        "late.ppm": b"P6\n16 16" + (b"\n# note" * (long // 7)) + b"\n255\n" + pixels[13:],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _assert_both_refuse(path, name, "a PPM whose header runs past its first 65,536 bytes", "re-save it")
    path = tmp_path / "commented.ppm"
    path.write_bytes(b"P6\n# made by hand\n# twice\n16   16\n255\n" + pixels[13:])
    assert load_image(path).size == (16, 16)
    for kind, mode in (("PPM", "1"), ("PPM", "L")):  # P4, P5
        path = tmp_path / f"{mode}.ppm"
        path.write_bytes(_saved(Image.new(mode, (16, 16)), kind))
        assert load_image(path).size == (16, 16)


def test_a_picture_too_large_for_pillows_python_decoders_is_refused_at_the_header(tmp_path):
    """Pillow decodes QOI, plain-text PNM, PNM of unusual maximum values and run-length-encoded BMP in
    Python, a pixel or a number at a time: a 24 MB QOI of 6000×4000 (one-byte pixels) took 16 s, a
    53 KB BMP of 13000×13000 (a pixel and an end of row a row) 26 s, one within the pixel limit minutes."""
    for side, refused in ((4097, True), (4096, False)):  # just over and at 2^24 pixels
        files = {
            f"big{side}.pgm": (b"P2\n%d %d\n255\n0 0 0\n" % (side, side), "a plain-text PNM image"),
            f"big{side}.ppm": (b"P6\n%d %d\n1023\n" % (side, side) + bytes(12), "a PNM image of 16-bit colour or an unusual maximum value"),
            # a 16-bit colour PPM is decoded in Python too: it was said to be of "an unusual maximum value"
            f"big{side}-16.ppm": (b"P6\n%d %d\n65535\n" % (side, side) + bytes(12), "a PNM image of 16-bit colour or an unusual maximum value"),
            f"big{side}.bmp": (_rle_bmp(side, side, b"\x01\x05\x00\x00"), "a run-length-encoded BMP image"),
        }
        for name, (data, what) in files.items():  # with no pixels past the first few
            path = tmp_path / name
            path.write_bytes(data)
            if refused:
                _assert_both_refuse(path, name, f"{what} of 4097×4097 pixels, more than the 16,777,216", "convert it to PNG")
            else:
                assert probe_image(path) == (side, side)
    small = {"small.qoi": _saved(Image.new("RGB", (16, 16), (10, 20, 30)), "QOI"), "small.ppm": b"P6\n16 16\n1023\n" + bytes(16 * 16 * 6),
             "small.bmp": _rle_bmp(16, 16, (b"\x10\x05\x00\x00") * 16 + b"\x00\x01")}  # fmt: skip
    for name, data in small.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert load_image(path).size == (16, 16), name


def _gif_of_one_frame() -> bytes:
    """A whole GIF of one 16×16 frame, without its trailer (";")."""
    out = io.BytesIO()
    Image.new("P", (16, 16), 3).save(out, "GIF")
    assert out.getvalue().endswith(b";")
    return out.getvalue()[:-1]


@pytest.mark.parametrize("tail", [b"!\xf9\x01\x01\x00", b",\x00\x00", b"!"])
def test_a_gif_damaged_after_its_first_frame_is_attached_without_a_note(tmp_path, tail):
    """Its first frame, the picture used, decodes; asking Pillow whether a second frame follows
    raised IndexError or struct.error from the damage, out of the attach line."""
    path = tmp_path / "cut.gif"
    path.write_bytes(_gif_of_one_frame() + tail)
    media_image.check_image_decodes(path)
    assert media_image.unused_pictures(path) is None
    assert media_image.is_animation(path) is False


def test_a_gif_is_animated_where_a_frame_follows_its_first(tmp_path):
    frame = _gif_of_one_frame()[13 + 3 * 2 :]  # after the header and its global colour table of 2 colours
    gif = _gif_of_one_frame()
    assert gif[10] & 0x87 == 0x80
    path = tmp_path / "two.gif"
    path.write_bytes(gif + b"!\xfe\x03abc\x00" + frame + b";")  # a comment, then a second frame
    assert media_image.unused_pictures(path) == "animated: only its first frame is used"
    assert media_image.is_animation(path) is True


def test_looking_for_a_gifs_second_frame_is_bounded(tmp_path):
    """Pillow walks the blocks after the first frame one at a time in Python, all of them: a GIF of
    a 16×16 frame and 4 million comment blocks took 3 s to attach, its decoding 0.1 s. Past
    MAX_GIF_WALK sub-blocks (more than any first frame within the pixel limit holds) nothing is said."""
    gif = _gif_of_one_frame()
    frame = gif[13 + 3 * 2 :]
    path = tmp_path / "flood.gif"
    path.write_bytes(gif + b"!\xfe\x00" * image_headers.MAX_GIF_WALK + frame + b";")
    assert media_image.unused_pictures(path) is None
    path.write_bytes(gif + b"!\xfe\x00" * 1000 + frame + b";")
    assert media_image.unused_pictures(path) == "animated: only its first frame is used"


def test_the_note_on_unused_pictures_never_waits_on_a_pipe(tmp_path):
    """/media says each attachment's line again, its note read from the file then: a picture replaced
    by a FIFO since it was attached blocked the REPL until something wrote to it (here a writer does,
    an animation, so a read of the pipe shows)."""
    animation = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    frames[0].save(animation, "PNG", save_all=True, append_images=frames[1:])
    pipe = tmp_path / "moving.png"
    os.mkfifo(pipe)

    def write() -> None:
        with open(pipe, "wb") as f:  # waits for a reader
            f.write(animation.getvalue())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert media_image.unused_pictures(pipe) is None
    finally:
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer finish, whatever was read
        writer.join()
        os.close(reader)


@pytest.mark.parametrize("subfile_type, note", [(2, "several pages: only its first is used"), (4, None), (5, None), (1, None)])
def test_a_tiffs_transparency_mask_is_no_page_of_its_own(tmp_path, subfile_type, note):
    """NewSubfileType's bit 2 marks a transparency mask (GDAL's internal nodata mask of a GeoTIFF:
    4, and 5 for its overviews' masks): such a TIFF was said to hold several pages."""
    picture = Image.fromarray(textured_rgb(64, 48, seed=5))
    path = tmp_path / "scan.tif"
    picture.save(path, save_all=True, append_images=[picture.convert("1")], tiffinfo={254: subfile_type})
    assert media_image.unused_pictures(path) == note


@pytest.mark.skipif("AVIF" not in media_image.image_formats(), reason="this Pillow has no AVIF support")
def test_an_animated_avif_is_said_to_be_used_by_its_first_frame(tmp_path):
    """An AVIF image sequence (a browser's or chat app's animation) went to the model as its first
    frame with nothing said, as an animated GIF, PNG or WebP no longer does."""
    frames = [Image.fromarray(textured_rgb(64, 48, seed=seed)) for seed in (1, 2)]
    frames[0].save(tmp_path / "moving.avif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "still.avif")
    assert media_image.unused_pictures(tmp_path / "moving.avif") == "animated: only its first frame is used"
    assert media_image.unused_pictures(tmp_path / "still.avif") is None


def _tiff_of_two_pictures(second_strips: int, subfile_type: int | None = None, big: bool = False) -> bytes:
    """A TIFF (or BigTIFF) of two 16×16 grey pictures, the second listing `second_strips` strips (all
    the same 256 bytes) and of NewSubfileType `subfile_type` (None: the tag left out)."""
    word, count_format, entry_format, long_type = ("Q", "Q", "<HHQQ", 16) if big else ("I", "H", "<HHII", 4)
    header, pixels = 16 if big else 8, bytes(range(256))
    offsets_at = header + len(pixels)
    first_at = offsets_at + second_strips * struct.calcsize(word)
    common = [(256, 3, 1, 16), (257, 3, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1)]

    def directory(tags: list, next_at: int) -> bytes:
        return (struct.pack(f"<{count_format}", len(tags)) + b"".join(struct.pack(entry_format, *tag) for tag in sorted(tags))
                + struct.pack(f"<{word}", next_at))  # fmt: skip

    first_tags = common + [(273, long_type, 1, header), (278, 3, 1, 16), (279, long_type, 1, 256)]
    second_at = first_at + len(directory(first_tags, 0))
    second_tags = common + [(273, long_type, second_strips, offsets_at), (278, 3, 1, 16), (279, 3, 1, 256)]
    if subfile_type is not None:
        second_tags.append((254, long_type, 1, subfile_type))
    start = b"II+\0" + struct.pack("<HHQ", 8, 0, first_at) if big else b"II*\0" + struct.pack("<I", first_at)
    offsets = struct.pack(f"<{word}", header) * second_strips
    return start + pixels + offsets + directory(first_tags, second_at) + directory(second_tags, 0)


@pytest.mark.parametrize("big", [False, True])
def test_a_tiffs_second_picture_is_read_from_its_header_not_by_pillows_seek(tmp_path, big):
    """Whether the second picture is a page was asked of Pillow, which turns every value of the second
    directory into Python values as it seeks there (the first is checked before it is opened): an 8 MB
    TIFF of a 16×16 page and a second listing 2 million strips took 7.5 s and 590 MB to attach, its
    decoding 0.2 s."""
    import tracemalloc

    path = tmp_path / "pages.tif"
    for subfile_type, note in ((None, "several pages: only its first is used"), (2, "several pages: only its first is used"), (1, None)):
        path.write_bytes(_tiff_of_two_pictures(4, subfile_type, big))
        assert media_image.unused_pictures(path) == note, subfile_type
    path.write_bytes(_tiff_of_two_pictures(1 << 21, 0, big))
    tracemalloc.start()
    try:
        note = media_image.unused_pictures(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert note == "several pages: only its first is used"
    assert peak < 8 << 20, peak  # the header walk's page of 1 MiB, not half a million Python values


def _qoi(width: int, height: int, ops: bytes) -> bytes:
    """A QOI file of RGB pixels whose ops are `ops` (and its end marker)."""
    return b"qoif" + struct.pack(">IIBB", width, height, 3, 0) + ops + bytes(7) + b"\x01"


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_qoi_decodes_to_the_pixels_pillow_decodes(tmp_path, mode):
    path = tmp_path / f"{mode}.qoi"
    rgba = np.dstack([textured_rgb(96, 40, seed=4), np.arange(96 * 40, dtype=np.uint8).reshape(40, 96)])
    Image.fromarray(rgba, "RGBA").convert(mode).save(path)
    with Image.open(path) as pillows:
        expected = np.asarray(to_rgb(pillows.convert(mode)))
    np.testing.assert_array_equal(np.asarray(media_image._decode(path)), expected)


def test_a_qoi_photo_of_more_pixels_than_pillows_python_decoder_reads_quickly_is_read(tmp_path):
    """Pillow decodes QOI in Python, 17 s for 16 megapixels: a QOI over 2^24 pixels was refused.
    FFmpeg's decoder reads it (0.3 s); only a strip too long for FFmpeg is left to Pillow's limit."""
    side = 4097  # just over 2^24 pixels
    ops = b"\xfe\x0a\x14\x1e" + b"\xfd" * ((side * side - 1) // 62) + bytes([0xC0 + (side * side - 1) % 62 - 1])
    path = tmp_path / "photo.qoi"
    path.write_bytes(_qoi(side, side, ops))  # one colour, (10, 20, 30): one RGB op, then runs
    picture = media_image._decode(path)
    assert picture.size == (side, side) and picture.getextrema() == ((10, 10), (20, 20), (30, 30))
    strip = tmp_path / "strip.qoi"
    strip.write_bytes(_qoi(170, 1 << 20, b"\xc0" * 8))  # (170+128)·(2^20+128) ≥ 2^28: FFmpeg refuses it
    _assert_both_refuse(strip, "a QOI image of 170×1048576 pixels, more than the 16,777,216", "convert it to PNG")


def test_a_qoi_of_too_few_bytes_for_its_pixels_is_refused_as_cut_short(tmp_path):
    """FFmpeg fills the pixels a QOI's data does not reach with its last colour, without a word (Pillow
    said "not enough image data"): a 22-byte file, a header and the end marker, declaring 13000×13000
    pixels became a 169-megapixel black picture, half a gigabyte decoded. An op byte gives 62 pixels
    at most (a run), so a file of fewer bytes than that cannot be whole."""
    for side in (13000, 64):
        path = tmp_path / f"hollow{side}.qoi"
        path.write_bytes(_qoi(side, side, b"\xfe\x0a\x14\x1e"))
        _assert_both_refuse_to_decode(path, f"hollow{side}.qoi", "truncated or corrupt", "too few bytes")
    whole = tmp_path / "whole.qoi"  # one RGB op, then runs of 62: the most pixels a byte holds
    whole.write_bytes(_qoi(62, 62, b"\xfe\x0a\x14\x1e" + b"\xfd" * 61 + b"\xfc"))
    assert media_image._decode(whole).getextrema() == ((10, 10), (20, 20), (30, 30))


# one RGB pixel (10, 20, 30), seven index ops of 0 and one of 1 (the bytes of the end marker: 8
# pixels of the index's first colour, black), one red pixel and a run of 6: 16 pixels
_MARKER_INSIDE = b"\xfe\x0a\x14\x1e" + bytes(7) + b"\x01" + b"\xfe\xff\x00\x00" + b"\xc5"


def test_a_qoi_whose_pixel_data_holds_the_bytes_of_its_end_marker_is_decoded_whole(tmp_path):
    """FFmpeg's qoi_pipe demuxer ends a picture's data after the first 8 bytes that equal the end
    marker: the 7 red pixels after them were left black (or whatever the buffer held)."""
    path = tmp_path / "inside.qoi"
    path.write_bytes(_qoi(4, 4, _MARKER_INSIDE))
    expected = [(10, 20, 30)] + [(0, 0, 0)] * 8 + [(255, 0, 0)] * 7
    assert np.asarray(media_image._decode(path)).reshape(-1, 3).tolist() == [list(p) for p in expected]
    assert load_image(path).size == (4, 4)


@pytest.mark.parametrize("at", [8, 6])  # right after those bytes; inside the RGB op before them
def test_a_qoi_cut_where_its_pixel_data_looks_like_its_end_marker_is_refused_as_cut_short(tmp_path, at):
    """Cut right after the 8 bytes that equal its end marker, a QOI ends as a whole one does, with
    bytes enough for its pixels by the check on its length: it was decoded, the pixels after the
    cut left black. Its ops run into its last 8 bytes, as a whole file's never do."""
    data = _qoi(4, 4, _MARKER_INSIDE)
    path = tmp_path / "cut.qoi"
    path.write_bytes(data[: 14 + 4 + 8] if at == 8 else data[:14] + _MARKER_INSIDE[:2] + bytes(7) + b"\x01")
    assert path.read_bytes().endswith(bytes(7) + b"\x01")
    _assert_both_refuse_to_decode(path, "cut.qoi", "truncated or corrupt", "ends before its last pixel", "re-download it")


def test_a_qoi_is_decoded_from_one_copy_of_its_bytes(tmp_path):
    """The file's bytes were read, then copied twice more in Python for each of its two decodes
    (the end marker cut off, another end put on): near four times the file at once, some 3.5 GB
    for the largest QOI allowed. They are read into one buffer, its last 8 bytes changed in place."""
    import tracemalloc

    rgba = np.random.default_rng(3).integers(0, 256, (300, 400, 4), dtype=np.uint8)  # RGBA ops: 5 bytes a pixel
    path = tmp_path / "noise.qoi"
    Image.fromarray(rgba, "RGBA").save(path, "QOI")
    size = path.stat().st_size
    with Image.open(path) as opened:
        media_image._qoi_by_ffmpeg(path, opened)  # PyAV's first use allocates for itself
        tracemalloc.start()
        try:
            picture = media_image._qoi_by_ffmpeg(path, opened)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(np.asarray(picture), rgba)
    assert peak < 1.5 * size, (peak, size)


def _assert_both_refuse_to_decode(path: Path, *words: str) -> None:
    """check_image_decodes (attaching) and load_image refuse `path` alike, in one line holding `words`."""
    for call in (media_image.check_image_decodes, load_image):
        with pytest.raises(MediaError) as err:
            call(path)
        _assert_one_line(err, *words)


def _rle_bmp(width: int, height: int, rows: bytes) -> bytes:
    """An 8-bit run-length-encoded BMP (a grey palette) whose pixel data is `rows`."""
    palette = b"".join(bytes((grey, grey, grey, 0)) for grey in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    start = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", start + len(rows), 0, 0, start) + info + palette + rows


def test_a_plain_text_pnm_of_countless_comments_among_its_pixels_is_refused_before_decoding(tmp_path):
    """Pillow strips each comment among a plain-text PNM's numbers by copying the rest of the
    megabyte it is in: a 4 MB file of two million empty comments took 36 s (minutes for a request body)."""
    for magic, pixel in ((b"P1", b"0 "), (b"P2", b"7 "), (b"P3", b"7 7 7 ")):
        path = tmp_path / f"comments_{magic.decode()}.pnm"
        size = b"4 4\n" if magic == b"P1" else b"4 4\n255\n"
        path.write_bytes(magic + b"\n" + size + pixel * 8 + b"#\n" * 1025 + pixel * 8)
        _assert_both_refuse(path, path.name, "a plain-text PNM of more than 1,024 comments among its pixels", "re-save it")
        path.write_bytes(magic + b"\n# made by hand\n" + size + pixel * 8 + b"# a row\n" * 100 + pixel * 8)
        assert load_image(path).size == (4, 4)
    path = tmp_path / "binary.pgm"  # a binary PNM's pixels are any bytes: a # among them is a grey, not a comment
    path.write_bytes(b"P5\n64 64\n255\n" + b"#" * 4096)
    assert load_image(path).size == (64, 64)


def test_a_jpeg_2000_header_among_countless_boxes_is_refused_before_pillow_walks_them(tmp_path):
    """Pillow walks a JPEG 2000 file's boxes up to its header one at a time in Python: 3 million
    empty ones (24 MB) took 4 s."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(out, "JPEG2000", no_jp2=False)
    jp2 = out.getvalue()
    header = jp2.index(b"jp2h") - 4
    free = b"\0\0\0\x08free"
    for name, data, refused in (
        ("before.jp2", jp2[:header] + free * (1 << 16) + jp2[header:], True),
        ("fewer.jp2", jp2[:header] + free * ((1 << 16) - 8) + jp2[header:], False),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        if refused:
            _assert_both_refuse(path, name, "a JPEG 2000 file of more than 65,536 boxes", "re-save it")
        else:
            assert load_image(path).size == (16, 16)


def _saved(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    """The decoder passes over the whole picture once per scan, and a scan can be 31 bytes: a 683 KB
    JPEG of 4000×4000 with 20,000 of them took 33 s (a 64 MB request body: about an hour)."""
    bomb = tmp_path / "scans.jpg"
    bomb.write_bytes(jpeg_with_empty_scans(64, 300))
    _assert_both_refuse(bomb, "scans.jpg", "a JPEG of 306 scans", "decompression bomb")
    fine = tmp_path / "fine.jpg"
    fine.write_bytes(jpeg_with_empty_scans(64, 200))  # odd but cheap: decoded
    assert load_image(fine).size == (64, 64)
    Image.fromarray(textured_rgb(300, 200, seed=4)).save(fine, "JPEG", progressive=True, optimize=True)
    assert load_image(fine).size == (300, 200)


def test_scans_are_counted_from_the_picture_start_to_its_end(tmp_path):
    """A motion photo appends its video after the picture's end (EOI), where the decoder stops, and
    compressed video holds 0xFF 0xDA by chance (about 300 in 20 MB): counted, they refused the photo
    as "a JPEG of 316 scans". Counting stops at EOI; an EOI inside a segment (an EXIF thumbnail's)
    does not stop it, nor hide the scans that follow."""
    buffer = io.BytesIO()
    Image.fromarray(textured_rgb(64, 48, seed=5)).save(buffer, "JPEG")
    motion = tmp_path / "motion.jpg"
    motion.write_bytes(buffer.getvalue() + b"\0\0\0\x18ftypmp42" + b"\xff\xda\x13" * 300)
    assert load_image(motion).size == (64, 48)
    bomb = jpeg_with_empty_scans(64, 300)
    thumbnail = b"\xff\xe1" + struct.pack(">H", 8) + b"\xff\xd8\xff\xd9\0\0"  # an APP1 holding a picture's start and end
    hidden = tmp_path / "hidden.jpg"
    hidden.write_bytes(bomb[:2] + thumbnail + bomb[2:])
    with pytest.raises(MediaError) as err:
        probe_image(hidden)
    _assert_one_line(err, "a JPEG of 306 scans", "decompression bomb")


def test_a_jpeg_cut_short_while_its_scans_are_counted_does_not_kill_the_app(tmp_path):
    """The scan count read a memory mapping of the file: one truncated meanwhile (a sync client
    rewriting the photo) killed the process with SIGBUS, no message. Run apart, so that it can."""
    import subprocess
    import sys
    import textwrap

    photo = tmp_path / "photo.jpg"
    Image.fromarray(textured_rgb(256, 256, seed=6)).save(photo, "JPEG", progressive=True)
    script = textwrap.dedent(f"""
        import os
        from internvl_chat.media import image_headers
        walk = image_headers._scans_before_end
        def cut_then_walk(data, *args, **kwargs):
            os.truncate({str(photo)!r}, 0)  # the file shrinks once it is open
            return walk(data, *args, **kwargs)
        image_headers._scans_before_end = cut_then_walk
        print(image_headers.jpeg_scans(image_headers.Path({str(photo)!r})))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert int(done.stdout) > 1  # counted from what was read before the cut


def test_scans_are_all_counted_where_the_picture_runs_past_what_the_walk_reads(tmp_path, monkeypatch):
    """A picture whose end lies past JPEG_WALK_BYTES is not taken to end there: every 0xFF 0xDA of
    the file counts (a bomb's scans after a long first scan stay refused)."""
    bomb = jpeg_with_empty_scans(64, 300)
    path = tmp_path / "long.jpg"
    path.write_bytes(bomb)
    monkeypatch.setattr(image_headers, "JPEG_WALK_BYTES", 200)  # the walk sees only the start of the picture
    with pytest.raises(MediaError) as err:
        probe_image(path)
    _assert_one_line(err, "a JPEG of ", "decompression bomb")


def test_a_damaged_avif_is_one_error_not_a_traceback(tmp_path):
    """Pillow's AVIF plugin raises RuntimeError for a file with no primary item (found by fuzzing);
    it went past the except clause and ended one-shot runs with a traceback."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(buffer, format="AVIF")
    path = tmp_path / "photo.avif"
    path.write_bytes(buffer.getvalue().replace(b"pitm", b"free", 1))  # the box naming the primary image
    for read in (probe_image, load_image):
        with pytest.raises(MediaError, match=r"^cannot read image .*photo\.avif \(Failed to decode image: .*\); re-export it as PNG or JPEG$"):
            read(path)


# ---------------------------------------------------------------- transformers' -hf image processor


def _hf_image_processor(min_tiles: int, max_tiles: int):
    got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    return got_ocr2.GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles,
                                             size={"height": 448, "width": 448}, image_mean=list(media_image.IMAGENET_MEAN),
                                             image_std=list(media_image.IMAGENET_STD), resample=3)  # fmt: skip


def test_tile_counts_match_transformers_internvl_image_processor():
    """The -hf reference (InternVLProcessor's GotOcr2 image processor, crop_to_patches) counts the
    same tiles for sizes at and beside tile boundaries, extreme strips and every limit up to 40."""
    rng = np.random.default_rng(3)
    sizes = [(448 * i + d, 448 * j) for i in range(1, 9) for j in range(1, 4) for d in (-1, 0, 1)]
    sizes += [(1, 10000), (10000, 1), (1, 1), (5, 4), (4, 5)] + [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(150)]
    for max_tiles in range(1, 41):
        processor = _hf_image_processor(1, max_tiles)
        for min_tiles in sorted({1, 2, max_tiles // 2, max_tiles} - {0}):
            if min_tiles > max_tiles:
                continue
            for width, height in sizes:
                theirs = processor.get_number_of_image_patches(height, width, {"min_patches": min_tiles, "max_patches": max_tiles})
                assert count_tiles(width, height, max_tiles, min_tiles=min_tiles) == theirs, (width, height, min_tiles, max_tiles)


@pytest.mark.parametrize("width, height, min_tiles, max_tiles", [(800, 600, 1, 12), (1, 3000, 1, 12), (3000, 2, 2, 6), (896, 448, 1, 12),
                                                                 (1400, 700, 1, 40), (37, 23, 4, 4)])  # fmt: skip
def test_tiles_match_transformers_internvl_image_processor(width, height, min_tiles, max_tiles):
    image = Image.fromarray(textured_rgb(width, height, seed=width + height))
    theirs = _hf_image_processor(min_tiles, max_tiles)(images=[image], return_tensors="np")["pixel_values"]
    ours = normalize_tiles(tile_image(image, max_tiles, True, 448, min_tiles)).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("colour_type, pixel", [(2, bytes([0, 0, 0])), (0, bytes([0]))])
def test_an_eight_bit_pngs_transparent_colour_past_255_makes_no_pixel_white(tmp_path, colour_type, pixel):
    """An 8-bit RGB or grey PNG whose tRNS key is out of its range (256): no pixel can have it, so
    nothing is transparent, but Pillow compared its low byte and every black pixel came out white."""
    key = struct.pack(">HHH", 256, 256, 256) if colour_type == 2 else struct.pack(">H", 256)
    row = b"\0" + pixel * 4 + bytes([9]) * (len(pixel) * 4)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 4, 8, colour_type, 0, 0, 0))
           + _png_chunk(b"tRNS", key) + _png_chunk(b"IDAT", zlib.compress(row * 4)) + _png_chunk(b"IEND", b""))  # fmt: skip
    path = tmp_path / "key.png"
    path.write_bytes(png)
    pixels = np.asarray(media_image._decode(path))
    assert (pixels[:, :4] == 0).all() and (pixels[:, 4:] == 9).all(), pixels[0]
