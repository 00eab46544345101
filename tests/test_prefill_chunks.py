"""Prefill in chunks: the same logits and cache as one forward, and a cancel between chunks.

A long prompt (a picture's hundreds of tokens, a replayed conversation) is prefilled in chunks of
`model.prefill_chunk` tokens, and the caller's cancel event is looked at between them, so a client
that leaves (or a server that stops) does not hold the engine for the whole prefill.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.cpu_features import decoder_weight_bytes
from internvl_chat.engine.loader import load_model
from internvl_chat.engine.model import prefill_chunk_tokens
from internvl_chat.errors import Cancelled
from media_helpers import textured_rgb
from session_helpers import final_event

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("media") / "scene.png"
    Image.fromarray(textured_rgb(800, 600, seed=5)).save(path)  # 12 tiles + thumbnail
    return path


def _cache_rows(model, end: int) -> list[torch.Tensor]:
    return [t[:, :, :end].clone() for pair in model.language_model.caches() for t in pair]


def test_chunks_give_the_logits_and_cache_of_one_forward(loaded, picture, monkeypatch):
    session = Session(loaded, SamplingParams(max_new_tokens=4))
    final_event(session.ask("Hello."))  # the picture's turn starts after cached tokens
    final_event(session.ask("What is in the picture?", [session.describe_image(picture)]))
    turn = session.turns[-1]
    ids = session.ids[turn.pos_before : turn.ids_before] + turn.prompt_ids
    features, start = turn.features, turn.pos_before
    assert len(ids) > 3 * 100  # chunks of 100 cut the picture's tokens (the image features) in three places

    whole = loaded.model.forward(ids, start, features)
    cache_whole = _cache_rows(loaded.model, start + len(ids))
    monkeypatch.setattr(loaded.model, "prefill_chunk", 100)
    chunked = loaded.model.forward(ids, start, features)
    cache_chunked = _cache_rows(loaded.model, start + len(ids))

    assert (chunked - whole).abs().max().item() <= TOL * whole.abs().max().item()
    for a, b in zip(cache_whole, cache_chunked):
        assert (a - b).abs().max().item() <= TOL * max(a.abs().max().item(), 1.0)


def test_chunk_size_follows_the_device_and_the_decoder_size():
    def params(hidden, layers, intermediate, vocab, heads=14, kv=2):
        head_dim = hidden // heads
        cfg = SimpleNamespace(hidden_size=hidden, num_layers=layers, q_size=heads * head_dim, kv_size=kv * head_dim,
                              intermediate_size=intermediate, vocab_size=vocab)  # fmt: skip
        return decoder_weight_bytes(cfg, bytes_per_weight=1)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    demo = params(192, 4, 512, 576, heads=6)
    half_b = params(896, 24, 4864, 151_936)  # Qwen2.5-0.5B: InternVL3-1B's decoder
    eight_b = params(3584, 28, 18_944, 151_674, heads=28, kv=4)
    assert prefill_chunk_tokens(cpu, demo) == 2048  # a tiny decoder: one forward for any usual prompt
    assert prefill_chunk_tokens(cpu, half_b) == 256
    assert prefill_chunk_tokens(cpu, eight_b) == 256  # the floor: smaller chunks prefill slower
    assert prefill_chunk_tokens(cuda, half_b) == prefill_chunk_tokens(cuda, eight_b) == 8192
    for n in (demo, half_b, eight_b, 1, 10**12):
        tokens = prefill_chunk_tokens(cpu, n)
        assert tokens & (tokens - 1) == 0 and 256 <= tokens <= 2048


def test_a_cancel_between_chunks_leaves_the_session_as_before(loaded, picture, monkeypatch):
    params = SamplingParams(max_new_tokens=6)
    reference = Session(loaded, params)
    final_event(reference.ask("Hello."))
    want = final_event(reference.ask("What is in the picture?", [reference.describe_image(picture)]))

    session = Session(loaded, params)
    final_event(session.ask("Hello."))
    before = (list(session.ids), session.start_pos, len(session.turns))
    monkeypatch.setattr(loaded.model, "prefill_chunk", 64)
    lm = loaded.model.language_model
    forward_embeds, chunks, cancel = lm.forward_embeds, [], threading.Event()

    def counting(h, start_pos, *args, **kwargs):
        chunks.append(h.shape[1])
        if len(chunks) == 2:
            cancel.set()  # as a server's handler does when its client leaves
        return forward_embeds(h, start_pos, *args, **kwargs)

    monkeypatch.setattr(lm, "forward_embeds", counting)
    with pytest.raises(Cancelled):
        final_event(session.ask("What is in the picture?", [session.describe_image(picture)], cancel=cancel))
    assert chunks == [64, 64]  # stopped at the next chunk, not at the end of the prefill
    assert (list(session.ids), session.start_pos, len(session.turns)) == before
    for t in (t for pair in lm.caches() for t in pair):
        assert not t[:, :, session.start_pos : session.start_pos + 128].any()  # the two chunks were cleared

    monkeypatch.setattr(lm, "forward_embeds", forward_embeds)
    got = final_event(session.ask("What is in the picture?", [session.describe_image(picture)]))
    assert got["token_ids"] == want["token_ids"]  # asked again: as if it had never been cancelled


def test_a_cancel_stops_the_vision_encoder_between_batches(loaded, picture, monkeypatch):
    session = Session(loaded, SamplingParams(max_new_tokens=4))
    monkeypatch.setattr(loaded.model, "vision_batch", 4)  # 13 tiles: four batches
    vision, batches, cancel = loaded.model.vision_model, [], threading.Event()
    vision_forward = vision.forward

    def counting(pixels):
        batches.append(pixels.shape[0])
        cancel.set()
        return vision_forward(pixels)

    monkeypatch.setattr(vision, "forward", counting)
    media = session.describe_image(picture)
    with pytest.raises(Cancelled):
        final_event(session.ask("What is in the picture?", [media], cancel=cancel))
    assert batches == [4]
    assert session.turns == [] and session.start_pos == 0
