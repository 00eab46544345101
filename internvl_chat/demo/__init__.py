"""The embedded demo: the tiny model shipped inside the package (`demo_model`), and the synthetic
scenes it was trained on (see `scenes`)."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..files import visible

# beside the package's modules in a checkout and in an install (pyproject's package-data) alike
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "demo_model"


def embedded_model_argument() -> str:
    """The embedded demo model's folder as `--model` takes it from the working folder: relative in
    the folder that holds the package (a checkout's root: internvl_chat/demo_model), else absolute
    (an installed package's is in site-packages, where the relative example named nothing), quoted
    for a shell."""
    path = EMBEDDED_MODEL
    try:
        if Path.cwd() == EMBEDDED_MODEL.parent.parent:
            path = EMBEDDED_MODEL.relative_to(EMBEDDED_MODEL.parent.parent)
    except OSError:  # the working folder is gone
        pass
    return visible(shlex.quote(str(path)))
