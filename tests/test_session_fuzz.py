"""A seeded state-machine fuzz of the conversation and its KV cache (tests/session_fuzz.py says what
it does and checks), on the tiny checkpoint in fp32 with the eager decode step; test_compiled.py runs
it with the compiled step.

INTERNVL_FUZZ_CASES=N runs N seeds (default 3) and INTERNVL_FUZZ_STEPS=M operations each (default
24): `INTERNVL_FUZZ_CASES=300 pytest tests/test_session_fuzz.py` before changing chat/session.py or
chat/generate.py. A failure names its seed and the operations that led to it.
"""

from __future__ import annotations

import pytest

from internvl_chat.engine.loader import load_model
from session_fuzz import SessionFuzz, fuzz_seeds, fuzz_steps, make_fuzz_media

CONTEXT = 2048  # a tile is 258 tokens: a few pictures, long texts or a /system fill it, so overflows happen


@pytest.fixture(scope="module")
def live(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def fresh(tiny_original):
    """A second model: each check prefills the whole conversation on it from scratch."""
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def fuzz_media(tmp_path_factory):
    return make_fuzz_media(tmp_path_factory.mktemp("fuzz_media"))


@pytest.mark.parametrize("seed", fuzz_seeds(3))
def test_random_conversations_keep_the_cache_equal_to_a_fresh_prefill(live, fresh, fuzz_media, tmp_path, seed):
    SessionFuzz(live, fresh, fuzz_media, tmp_path, seed).run(fuzz_steps())
