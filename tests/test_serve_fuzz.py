"""A seeded differential fuzz of serve's engine (tests/serve_fuzz.py says what it does and checks), on
the tiny checkpoint in fp32 with 1 to 3 KV slots.

INTERNVL_FUZZ_CASES=N runs N seeds (default 3) and INTERNVL_FUZZ_STEPS=M requests each (default
16). A failure names its seed and the requests that led to it.
"""

from __future__ import annotations

import pytest
from PIL import Image

from internvl_chat.engine.loader import load_model
from media_helpers import textured_rgb
from serve_fuzz import ServeFuzz
from serve_support import png_bytes
from session_fuzz import fuzz_seeds, fuzz_steps

CONTEXT = 2048


@pytest.fixture(scope="module")
def live(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def fresh(tiny_original):
    """A second model: each check prefills from scratch on it."""
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def pictures():
    # a and b: one tile each, the same size (the same prompt ids); wide: 2 tiles and a thumbnail
    return {"a": png_bytes(textured_rgb(448, 448, seed=41)), "b": png_bytes(textured_rgb(448, 448, seed=42)),
            "wide": png_bytes(textured_rgb(896, 448, seed=43))}


@pytest.mark.parametrize("seed", fuzz_seeds(3))
def test_random_requests_answer_as_a_fresh_model_and_count_what_the_slots_kept(live, fresh, pictures, seed):
    ServeFuzz(live, fresh, pictures, seed, slots=1 + seed % 3).run(fuzz_steps(16))
