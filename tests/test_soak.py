"""Resources a long-running app or server must give back: counted, not timed (soak findings)."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from serve_support import chat_body, png_bytes


def _picture_url(seed: int) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def _picture_message(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": _picture_url(seed)}}]}]  # fmt: skip


def _slot_features(server) -> list:
    return [t.features for s in server.worker.slots.slots for t in s.session.turns if t.features is not None]


def test_a_request_that_fails_after_its_answer_keeps_no_features_on_its_slot(server, client):
    # the engine drops the turn's image features the Session keeps for /retry once an answer is
    # done; a request that failed after the Session committed its answer (a 500 from a bug, an
    # out-of-memory building its logprobs) left them on its slot until the slot's next request:
    # memory outside the feature cache's bound, held while the server idles
    worker = server.worker

    def fail(job, event):
        if event["finish_reason"] is not None:
            raise RuntimeError("a failure after the answer")

    worker.on_event = fail
    try:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**{**chat_body(""), "messages": _picture_message(1)}, max_tokens=2)
    finally:
        worker.on_event = None
    assert worker.wait_idle(60)
    assert _slot_features(server) == []
    # and an answer that ends as it should keeps none either
    client.chat.completions.create(**{**chat_body(""), "messages": _picture_message(2)}, max_tokens=2)
    assert _slot_features(server) == []


def test_many_distinct_pictures_stay_within_the_feature_cache_bound(server, client):
    # bounded by design: the LRU's bytes (counted from each tensor's own storage), the URL
    # measurements' entries; the slots keep no features beside it and no temp file stays behind
    from internvl_chat.serve.features import FeatureCache

    worker = server.worker
    body = {**chat_body(""), "messages": _picture_message(100)}
    client.chat.completions.create(**body, max_tokens=1)
    one = max(t.untyped_storage().nbytes() for t in worker.features._items.values())
    kept, worker.features = worker.features, FeatureCache(int(one * 2.5))
    try:
        for n, seed in enumerate(range(101, 109)):
            client.chat.completions.create(**{**body, "messages": _picture_message(seed)}, max_tokens=1)
            held = list(worker.features._items.values())
            assert len(held) == min(n + 1, 2)
            assert sum(t.untyped_storage().nbytes() for t in held) == worker.features.bytes <= worker.features.max_bytes
            assert _slot_features(server) == []
        assert worker.features.misses == 8 and worker.features.hits == 0
        assert list(worker.reader._tmp.iterdir()) == []
    finally:
        worker.features = kept
