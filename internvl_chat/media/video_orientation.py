"""How a player turns or mirrors a video's stored frames: FFmpeg's display matrix or an older
`rotate` tag read as one of the eight PIL transposes, which compose and invert exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


# The eight ways to turn or mirror a picture, as PIL operations (None: as stored) and as integer
# matrices (m11, m12, m21, m22) with x' = m11·x + m12·y, y' = m21·x + m22·y in picture coordinates
# (y pointing down), the convention of FFmpeg's display matrix.
Orientation = Image.Transpose | None
_MATRICES: dict[Orientation, tuple[int, int, int, int]] = {
    None: (1, 0, 0, 1),
    Image.Transpose.FLIP_LEFT_RIGHT: (-1, 0, 0, 1),
    Image.Transpose.FLIP_TOP_BOTTOM: (1, 0, 0, -1),
    Image.Transpose.ROTATE_180: (-1, 0, 0, -1),
    Image.Transpose.ROTATE_90: (0, 1, -1, 0),  # counter-clockwise
    Image.Transpose.ROTATE_270: (0, -1, 1, 0),  # clockwise, as a phone held upright records
    Image.Transpose.TRANSPOSE: (0, 1, 1, 0),
    Image.Transpose.TRANSVERSE: (0, -1, -1, 0),
}
_BY_MATRIX = {m: o for o, m in _MATRICES.items()}
CLOCKWISE = [None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90]


def orientation_from_display_matrix(matrix: Sequence[int]) -> Orientation:
    """The turn/mirror a player applies for FFmpeg's 3×3 display matrix (row-major, 16.16 fixed point).

    p' = a·p + c·q, q' = b·p + d·q with (a, b, c, d) = matrix[0, 1, 3, 4]. Translation and scale
    do not matter for a picture; an angle that is not a multiple of 90° snaps to the nearest one.
    """
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if not any((a, b, c, d)):
        return None
    # the nearest of the eight: the largest inner product with the (scaled) matrix
    return max(_MATRICES, key=lambda o: sum(x * y for x, y in zip(_MATRICES[o], (a, c, b, d))))


def orientation_from_rotate_tag(value: str) -> Orientation:
    """A `rotate` metadata tag: degrees clockwise; anything unreadable means no turn."""
    try:
        degrees = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(degrees):
        return None
    return CLOCKWISE[round(degrees / 90) % 4]


def compose(first: Orientation, then: Orientation) -> Orientation:
    """The single operation equal to applying `first`, then `then`."""
    p11, p12, p21, p22 = _MATRICES[first]
    q11, q12, q21, q22 = _MATRICES[then]
    return _BY_MATRIX[(q11 * p11 + q12 * p21, q11 * p12 + q12 * p22, q21 * p11 + q22 * p21, q21 * p12 + q22 * p22)]


def inverse(orientation: Orientation) -> Orientation:
    m11, m12, m21, m22 = _MATRICES[orientation]
    return _BY_MATRIX[(m11, m21, m12, m22)]  # orthogonal: the inverse is the transpose


def swaps_sides(orientation: Orientation) -> bool:
    return _MATRICES[orientation][0] == 0
