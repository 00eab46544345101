"""A seeded differential fuzz of serve's engine (tests/serve_fuzz.py says what it does and checks), on
the tiny checkpoint in fp32 with 1 to 3 KV slots.

INTERNVL_FUZZ_CASES=N runs N seeds (default 3) and INTERNVL_FUZZ_STEPS=M requests each (default
16). A failure names its seed and the requests that led to it.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from internvl_chat.engine.loader import load_model
from internvl_chat.serve.conversation import sampling_params
from internvl_chat.serve.engine import EngineWorker, Job
from internvl_chat.serve.options import ServeOptions
from internvl_chat.serve.protocol import choices, parse_request, stop_strings
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


def _served(worker: EngineWorker, body: dict, on_event=None) -> list[tuple[str, object]]:
    """Serve a chat request on the test's thread (as the fuzz does) and return its events."""
    req = parse_request(json.dumps(body).encode())
    prompt = worker.prompts.make(req)
    params = sampling_params(req, worker.options.defaults, len(prompt.ids), CONTEXT)
    job = Job(prompt, params, stop_strings(req), asyncio.new_event_loop(), choices=choices(req))
    worker.on_event = on_event
    try:
        worker._serve(job)
    finally:
        worker.on_event = None
        job.loop.close()
    return list(job.events._items)


def test_a_stop_string_in_the_last_event_cuts_the_answer_even_if_the_job_is_cancelled_then(live):
    """Found by the fuzz (seed 117): the server stopping (end_jobs sets the running job's cancel) or a
    client leaving as the answer's last token comes must not make a stop string's choice a "length"
    one whose text is cut but whose ids (and usage) are the whole answer's: the answer memory then
    mapped the cut text to ids that spell more, and a resent conversation held other ids than ours."""
    worker = EngineWorker(live, ServeOptions(slots=1))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me about the red cat"}],
                "temperature": 0, "max_tokens": 6}  # fmt: skip
        whole = next(p for k, p in _served(worker, body) if k == "choice")
        text = live.tokenizer.decode(whole["token_ids"])
        assert len(text) >= 3 and whole["finish_reason"] == "length"
        body["stop"] = [text[-2:]]  # in the last token's text (a stop string is matched in the text sent)
        wanted = next(p for k, p in _served(worker, body) if k == "choice")
        assert wanted["finish_reason"] == "stop"

        def leave_at_the_last_event(job, event):
            if event["finish_reason"] is not None:
                job.cancel.set()  # its client leaves (or the server stops: end_jobs) as the last token comes

        events = _served(worker, body, leave_at_the_last_event)
    finally:
        worker.reader.close()
    got = next(p for k, p in events if k == "choice")
    assert (got["finish_reason"], got["text"], got["token_ids"], got["usage"]) == (
        wanted["finish_reason"], wanted["text"], wanted["token_ids"], wanted["usage"])
    remembered = worker.answers.lookup(got["text"])
    assert remembered is None or live.tokenizer.decode(remembered) == got["text"]
