"""Each distinct picture or video of a request is decoded and encoded once, whatever the feature cache
holds: the same content twice in one request (two user messages in a row, or one message) is read
once and its features are used for every occurrence, and the request's video decoding limit counts
that one decode. Answers are those of the terminal app's Session, which encodes each attachment.
Once answered, a slot keeps no features (only the LRU holds them, within its size).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from PIL import Image

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.chat.template import MediaSpec
from internvl_chat.engine.loader import load_model
from internvl_chat.serve import media as serve_media
from internvl_chat.serve.features import FeatureCache
from media_helpers import textured_rgb, write_numbered_video
from serve_support import data_url

FRAMES = {"media_io_kwargs": {"video": {"num_frames": 4}}}


@pytest.fixture(scope="module")
def local(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve_features")
    Image.fromarray(textured_rgb(900, 450, seed=11)).save(d / "wide.png")  # 2×1 + thumbnail: 3 tiles
    Image.fromarray(textured_rgb(448, 448, seed=12)).save(d / "square.png")  # 1 tile
    write_numbered_video(d / "clip.mp4", num_frames=29)
    return d


@pytest.fixture
def calls(server, monkeypatch):
    """Counts of what the engine does: media decoded (reader.pixels), video files decoded, tiles encoded."""
    seen = {"decoded": [], "videos": 0, "encoded": []}
    reader, model = server.worker.reader, server.worker.model
    pixels, encode, load_video = reader.pixels, model.encode_images, serve_media.load_video

    def counted_pixels(item, *a, **kw):
        seen["decoded"].append(item.key)
        return pixels(item, *a, **kw)

    def counted_encode(tiles, *a, **kw):
        seen["encoded"].append(tiles.shape[0])
        return encode(tiles, *a, **kw)

    def counted_load_video(*a, **kw):
        seen["videos"] += 1
        return load_video(*a, **kw)

    monkeypatch.setattr(reader, "pixels", counted_pixels)
    monkeypatch.setattr(model, "encode_images", counted_encode)
    monkeypatch.setattr(serve_media, "load_video", counted_load_video)
    return seen


@pytest.fixture(params=["off", "too small", "on"])
def cache(request, server, monkeypatch) -> str:
    """A fresh feature cache: off (feature_cache_mb = 0), on but smaller than any picture's features, or on."""
    size = {"off": 0, "too small": 1, "on": 256 << 20}[request.param]
    monkeypatch.setattr(server.worker, "features", FeatureCache(size))
    return request.param


def forget_prompts(server) -> None:
    """Empty the KV slots, so a request is prefilled (and its media read) in full."""
    for slot in server.worker.slots.slots:
        slot.session.clear()
        slot.spans = []


def image(path: Path, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path, "image/png"), **extra}}


def video(path: Path) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, "video/mp4")}}


def complete(client, messages, **extra):
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True, **extra})  # fmt: skip
    return out.choices[0].model_extra["token_ids"], out.choices[0].message.content, out.usage


def local_answer(loaded, text: str, attach) -> tuple[list[int], str, int]:
    session = Session(loaded)
    media = attach(session)
    final = None
    for event in session.ask(text, media, SamplingParams(max_new_tokens=6)):
        final = event
    return final["token_ids"], session.turns[-1].answer_text, len(session.turns[-1].prompt_ids)


def test_a_picture_twice_in_one_message_is_encoded_once_and_answered_as_the_session_answers(
        server, client, local, media, calls, cache):  # fmt: skip
    forget_prompts(server)
    wanted = local_answer(local, "Same?", lambda s: [s.describe_image(media / "wide.png")] * 2)
    content = [image(media / "wide.png"), image(media / "wide.png"), {"type": "text", "text": "Same?"}]
    ids, text, usage = complete(client, [{"role": "user", "content": content}])
    assert (ids, text, usage.prompt_tokens) == wanted
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert len(calls["decoded"]) == 1 and calls["encoded"] == [3]


def test_a_video_in_two_user_messages_in_a_row_is_decoded_and_encoded_once(server, client, builder, media, calls, cache):
    forget_prompts(server)
    messages = [{"role": "user", "content": [video(media / "clip.mp4"), {"type": "text", "text": "Watch this."}]},
                {"role": "user", "content": [video(media / "clip.mp4"), {"type": "text", "text": "And again?"}]}]  # fmt: skip
    ids, text, usage = complete(client, messages, **FRAMES)
    assert (len(calls["decoded"]), calls["videos"], calls["encoded"]) == (1, 1, [4])
    second = builder.message("user", "And again?", [MediaSpec("video", 4)])
    assert usage.prompt_tokens == len(builder.first_turn("Watch this.", [MediaSpec("video", 4)])) + len(second)
    # the same answer as a request whose second video comes from the feature cache
    server.worker.features = FeatureCache(256 << 20)
    forget_prompts(server)
    assert complete(client, messages, **FRAMES) == (ids, text, usage)


def test_a_video_twice_in_one_message_is_decoded_once_and_answered_as_the_session_answers(
        server, client, local, media, calls, cache):  # fmt: skip
    forget_prompts(server)
    wanted = local_answer(local, "Twice?", lambda s: [s.describe_video(media / "clip.mp4", frames=4)] * 2)
    content = [video(media / "clip.mp4"), video(media / "clip.mp4"), {"type": "text", "text": "Twice?"}]
    ids, text, usage = complete(client, [{"role": "user", "content": content}], **FRAMES)
    assert (ids, text, usage.prompt_tokens) == wanted
    assert (len(calls["decoded"]), calls["videos"], calls["encoded"]) == (1, 1, [4])


def test_the_decoding_limit_counts_a_video_read_once_for_all_its_occurrences(server, client, media, calls, cache,
                                                                           monkeypatch):  # fmt: skip
    from internvl_chat.media.video import decode_cost

    forget_prompts(server)
    clip = write_numbered_video(media / "clip31.mp4", num_frames=31)  # a file no other test sends
    cost = decode_cost(clip, 4).pixels
    monkeypatch.setattr(server.options, "max_video_decode_pixels", 2 * cost - 1)  # one decode fits, two would not
    messages = [{"role": "user", "content": [video(clip), {"type": "text", "text": "One."}]},
                {"role": "user", "content": [video(clip), {"type": "text", "text": "Two."}]}]  # fmt: skip
    complete(client, messages, **FRAMES)  # refused as over the limit (used by "those before this one": itself) when decoded twice
    assert calls["videos"] == 1


def test_one_picture_at_two_tile_limits_is_two_contents(server, client, builder, media, calls, cache):
    forget_prompts(server)
    content = [image(media / "wide.png", max_dynamic_patch=1), image(media / "wide.png"), {"type": "text", "text": "Q"}]
    _, _, usage = complete(client, [{"role": "user", "content": content}])
    assert usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("image", 1), MediaSpec("image", 3)]))
    assert len(set(calls["decoded"])) == 2 and sorted(calls["encoded"]) == [1, 3]
    # the checkpoint's own limit (12) named explicitly is the same tiling: one content
    calls["decoded"].clear()
    calls["encoded"].clear()
    forget_prompts(server)
    content = [image(media / "square.png", max_dynamic_patch=12), image(media / "square.png"), {"type": "text", "text": "Q"}]
    complete(client, [{"role": "user", "content": content}])
    assert calls["encoded"] == [1]



def test_a_slot_keeps_no_features_once_its_request_is_answered(server, client, media):
    # the Session keeps a turn's features for /retry, which serve never does: in a slot they were
    # memory (on the GPU) that no setting accounts for, held until the slot's next request
    forget_prompts(server)
    complete(client, [{"role": "user", "content": [image(media / "wide.png"), {"type": "text", "text": "Kept?"}]}])
    turns = [turn for slot in server.worker.slots.slots for turn in slot.session.turns]
    assert turns and all(turn.features is None for turn in turns)
