"""RemoteConversation against an in-process server replaying recorded lmdeploy / vLLM / llama.cpp replies.

What is proven here: the model and dialect come from GET /models; each dialect's request body is
the one its server reads as InternVL's prompt; pictures are byte-identical on every resend and
replies are resent exactly as returned; streaming, usage and server timings; cancel keeps the
partial answer; retry / undo / system / save / load work on the client-side history.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from media_helpers import (
    cut_at_frame,
    faststart_copy,
    png_with_exif_after_pixels,
    read_frame_number,
    textured_rgb,
    write_numbered_video,
)
from PIL import Image
from remote_helpers import FakeServer, Reply, fixture

from internvl_chat.chat import remote, remote_http, remote_stream
from internvl_chat.chat.conversation import Conversation
from internvl_chat.chat.dialects import DIALECTS, detect_dialect, user_content
from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.template import MediaSpec, PromptBuilder
from internvl_chat.errors import ContextOverflowError, MediaError, RemoteError, UsageError
from internvl_chat.media.image import IMAGENET_MEAN, IMAGENET_STD
from internvl_chat.settings import REMOTE_DIALECTS

REPLY = "A red circle on white.\n"


def models_of(dialect: str) -> bytes:
    return fixture(f"{dialect}/models.json")


def stream_of(dialect: str, piece_size: int = 0) -> Reply:
    return Reply.sse(fixture(f"{dialect}/stream.sse"), piece_size)


def connect(server: FakeServer, **kwargs) -> RemoteConversation:
    kwargs.setdefault("params", SamplingParams(max_new_tokens=64))
    return RemoteConversation.connect(server.url, **kwargs)


def answer(events) -> tuple[str, dict]:
    events = list(events)
    assert all(e["finish_reason"] is None for e in events[:-1])
    return "".join(e["text"] for e in events), events[-1]


def png(path, size=(64, 48), color=(200, 30, 30), mode="RGB") -> str:
    Image.new(mode, size, color).save(path)
    return str(path)


def b64_of(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.endswith(";base64")
    return base64.b64decode(data)


# ---- handshake: model, dialect, context ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "model", "context"),
    [("vllm", "OpenGVLab/InternVL3-8B", 32768), ("lmdeploy", "OpenGVLab/InternVL3-8B", None), ("llamacpp", "model.gguf", 8192)],
)
def test_the_model_list_names_model_dialect_and_context(dialect, model, context):
    with FakeServer(models_of(dialect)) as server:
        conv = connect(server)
        assert (conv.model, conv.dialect, conv.max_context) == (model, dialect, context)
        info = conv.describe()
        assert info.name == model and info.context == context and info.memory_device is None
        assert server.url in info.where
        assert server.requests[0].path == "/v1/models"
        assert isinstance(conv, Conversation)


def test_owned_by_values_and_forcing_a_dialect():
    assert detect_dialect("library") == "ollama"  # Ollama fills owned_by with the model's namespace
    assert detect_dialect("internvl-chat") == "internvl-chat"
    assert detect_dialect("openai") == "generic" and detect_dialect(None) == "generic"
    assert REMOTE_DIALECTS == ("auto", *DIALECTS)  # settings.py names the same dialects
    with FakeServer(models_of("vllm")) as server:
        assert connect(server, dialect="sglang").dialect == "sglang"
        with pytest.raises(UsageError, match="unknown dialect 'klingon'"):
            connect(server, dialect="klingon")


def test_model_cards_a_request_cannot_name_or_absurd_contexts_are_passed_over():
    """A model id holding a lone surrogate (JSON "\\ud800") cannot be sent back in a UTF-8 request
    body; a context beyond any real model's (2**31 tokens) is a broken card, not a limit to show."""
    cards = b'{"data": [{"id": "bad\\ud800", "owned_by": "vllm"}, {"id": "m", "owned_by": "vllm", "max_model_len": 1' + b"0" * 40 + b'}]}'
    with FakeServer(cards) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server)
        assert (conv.model, conv.max_context) == ("m", None)
        answer(conv.ask("hi"))
    with FakeServer(b'{"data": [{"id": "\\udfff"}]}') as server:
        with pytest.raises(RemoteError, match="serves no model"):
            connect(server)


def test_json_that_starts_with_a_byte_order_mark_is_read_as_in_an_answer():
    """A chat answer with a UTF-8 byte-order mark was read, but GET /models with one was "not JSON"
    (and an error body with one lost its message): every JSON body is read the same way."""
    bom = b"\xef\xbb\xbf"
    with FakeServer(bom + models_of("vllm")) as server:
        server.chat(Reply.json(bom + b'{"choices": [{"index": 0, "message": {"content": "Hi."}, "finish_reason": "stop"}]}'))
        conv = connect(server)
        assert (conv.model, conv.dialect, conv.max_context) == ("OpenGVLab/InternVL3-8B", "vllm", 32768)
        assert answer(conv.ask("hi"))[0] == "Hi."
        server.replies["/v1/models"].append(Reply.json(bom + b'{"error": {"message": "models are reloading"}}', 503))
        with pytest.raises(RemoteError, match=r"^the server answered 503 Service Unavailable: models are reloading; "
                                              r"the server cannot take requests now"):  # not its JSON shown raw
            connect(server)


def test_a_model_id_too_long_for_any_real_server_is_passed_over():
    """A megabyte-long id would be named in every request body and fill the banner and /stats."""
    huge = "m" * 5000
    cards = {"data": [{"id": huge, "owned_by": "vllm"}, {"id": "OpenGVLab/InternVL3-8B", "owned_by": "vllm"}]}
    with FakeServer(json.dumps(cards).encode()) as server:
        assert connect(server).model == "OpenGVLab/InternVL3-8B"
        with pytest.raises(UsageError, match="does not serve") as refused:
            connect(server, model="InternVL3-9B")
        assert len(str(refused.value)) < 600  # the served ids are named shortened


def test_a_hostile_model_id_in_the_refusal_is_escaped_once():
    """The asked id was escaped, then quoted with repr(), which doubled each backslash of the
    escapes: an ESC showed as `\\\\e`, a bidi override as `\\\\u202e`. The served ids are escaped too."""
    cards = {"data": [{"id": "served\x1b]8;;http://x\x07id\u202e", "owned_by": "vllm"}]}
    with FakeServer(json.dumps(cards).encode()) as server:
        with pytest.raises(UsageError) as refused:
            connect(server, model="asked\x1b[31mid\u202e")
    line = str(refused.value)
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line, repr(line)
    assert "does not serve 'asked\\e[31mid\\u202e';" in line, line
    assert "served\\e]8;;http://x\\x07id\\u202e" in line, line
    assert "\\\\" not in line, line  # no escape escaped again


def test_a_model_the_server_does_not_serve_is_refused_with_the_served_ones():
    with FakeServer(models_of("lmdeploy")) as server:
        with pytest.raises(UsageError, match=r"does not serve 'InternVL3-9B'.*OpenGVLab/InternVL3-8B"):
            connect(server, model="InternVL3-9B")
        assert connect(server, model="OpenGVLab/InternVL3-8B").model == "OpenGVLab/InternVL3-8B"


def test_a_model_list_too_long_to_name_says_how_many_more_it_holds():
    """Of thousands of served models only the first few are named: the line says the rest exist, so
    "must be one of" is not taken to be the whole list (and the one asked for sought among them)."""
    cards = {"data": [{"id": f"m{n:05d}", "owned_by": "vllm"} for n in range(20_000)]}
    with FakeServer(json.dumps(cards).encode()) as server:
        with pytest.raises(UsageError, match=r"one of: m00000, .*m00007, … and 19,992 more$") as refused:
            connect(server, model="zz")
        assert "m00008" not in str(refused.value)


def test_the_api_key_goes_as_a_bearer_token():
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server, api_key="sk-test-123")
        answer(conv.ask("hi"))
        assert all(r.headers.get("Authorization") == "Bearer sk-test-123" for r in server.requests)


def test_a_server_setting_thousands_of_cookies_leaves_a_small_jar_and_a_sticky_cookie_works():
    """A server (or gateway) that sets a thousand new cookies on every answer: httpx's own jar kept
    them all for the session and sent them all back. The jar is bounded (each cookie too), the
    first ones set are kept, a kept cookie can still be replaced (a gateway's sticky session), and
    the turns go on."""
    turns = 4
    with FakeServer(models_of("vllm")) as server:
        for turn in range(turns):
            cookies = [f"route=replica-{turn}; Path=/"] if turn in (0, 2) else []
            cookies += [f"c{turn}x{n}=v; Path=/" for n in range(1000)] + [f"huge{turn}={'x' * 5000}; Path=/"]
            server.chat(Reply(pieces=[fixture("vllm/stream.sse")], cookies=cookies))
        conv = connect(server)
        for turn in range(turns):
            text, final = answer(conv.ask(f"turn {turn}"))
            assert text == REPLY and final["finish_reason"] == "stop"
            jar = conv.client.http.cookies.jar
            assert len(jar) <= remote_http.MAX_COOKIES, f"turn {turn}: {len(jar)} cookies kept"
            assert all(not c.name.startswith("huge") for c in jar)
        sent = [r.headers.get("Cookie", "") for r in server.requests if r.path == "/v1/chat/completions"]
        assert sent[0] == ""
        assert sent[1].startswith("route=replica-0") and sent[3].startswith("route=replica-2")
        assert all(len(s) < remote_http.MAX_COOKIES * 64 for s in sent)


def test_cookies_that_expired_leave_room_in_the_jar(monkeypatch):
    """A server sets short-lived cookies (a bot check's, a CSRF token's), and later the gateway's
    sticky one. The jar never dropped an expired cookie (httpx clears expired ones only in the copy
    it makes for each request), so expired ones filled it for good and the sticky cookie was not
    kept: expired ones are cleared before a new cookie is refused."""
    import http.cookiejar

    class Later:  # the cookie jar's clock, two minutes on once the short-lived cookies are set
        offset = 0.0

        def __getattr__(self, name):
            return getattr(time, name)

        def time(self):
            return time.time() + self.offset

    later = Later()
    monkeypatch.setattr(http.cookiejar, "time", later)
    with FakeServer(models_of("vllm")) as server:
        short = [f"check{n}=v; Max-Age=60; Path=/" for n in range(remote_http.MAX_COOKIES)]
        server.chat(Reply(pieces=[fixture("vllm/stream.sse")], cookies=short))
        server.chat(Reply(pieces=[fixture("vllm/stream.sse")], cookies=["route=replica-1; Path=/"]))
        server.chat(Reply(pieces=[fixture("vllm/stream.sse")]))
        conv = connect(server)
        answer(conv.ask("turn 0"))
        later.offset = 120.0
        answer(conv.ask("turn 1"))
        answer(conv.ask("turn 2"))
        sent = [r.headers.get("Cookie", "") for r in server.requests if r.path == "/v1/chat/completions"]
        assert sent[2] == "route=replica-1", sent


# ---- request bodies per dialect ------------------------------------------------------------------


def _images_then_video(tmp_path, dialect: str) -> tuple[list[dict], RemoteConversation]:
    a = png(tmp_path / "a.png", color=(200, 30, 30))
    b = png(tmp_path / "b.png", color=(30, 30, 200))
    video = write_numbered_video(tmp_path / "v.mp4", 20)
    with FakeServer(models_of(dialect)) as server:
        server.chat(stream_of(dialect), stream_of(dialect))
        conv = connect(server, system_message="Answer briefly.")
        answer(conv.ask("Compare them.", [conv.describe_image(a, 6), conv.describe_image(b, 6)]))
        answer(conv.ask("What happens?", [conv.describe_video(video, 2)]))
        return server.chat_bodies(), conv


def test_a_picture_changed_since_it_was_measured_is_named_escaped(tmp_path):
    """A saved session names its pictures: the path came out raw in "has changed since it was
    attached", so a name holding a terminal escape reached the screen."""
    path = tmp_path / "a\x1b[2Jb.png"
    png(path)
    with FakeServer(models_of("lmdeploy")) as server:
        conv = connect(server)
        item = conv.describe_image(path)
        item.sha256 = "0" * 64  # the bytes a session file saved for it were others
        with pytest.raises(MediaError) as err:
            list(conv.ask("Hi", [item]))
    assert str(err.value) == f"{tmp_path}/a\\e[2Jb.png has changed since it was attached; attach it again"


@pytest.mark.parametrize("dialect", ["lmdeploy", "vllm", "llamacpp"])
def test_request_bodies_match_each_servers_documented_shape(tmp_path, dialect):
    bodies, conv = _images_then_video(tmp_path, dialect)
    images = [m.picture.url for m in conv.turns[0].media]
    frames = [f.url for f in conv.turns[1].media[0].clip.frames]
    expected = fixture(f"{dialect}/request_images_then_video.json").decode()
    for name, url in {"IMAGE_1": images[0], "IMAGE_2": images[1], "FRAME_1": frames[0], "FRAME_2": frames[1],
                      "VIDEO_1": conv.turns[1].media[0].clip.video_url}.items():  # fmt: skip
        expected = expected.replace("{%s}" % name, url)
    assert bodies[1] == json.loads(expected)
    # the first turn is resent byte for byte: same pictures, same text, the reply as returned
    first = json.dumps(bodies[0]["messages"][1], ensure_ascii=False)
    assert json.dumps(bodies[1]["messages"][1], ensure_ascii=False) == first
    assert bodies[1]["messages"][2] == {"role": "assistant", "content": REPLY}


def test_images_are_sent_as_the_files_own_bytes(tmp_path):
    bodies, conv = _images_then_video(tmp_path, "lmdeploy")
    sent = bodies[0]["messages"][1]["content"][1]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")
    assert b64_of(sent) == (tmp_path / "a.png").read_bytes()


def test_video_frames_are_our_samplers_frames(tmp_path):
    """The frames sent are the ones media/video.py samples (frame numbers read back from the JPEGs)."""
    from internvl_chat.media.video_sampling import frame_indices

    video = write_numbered_video(tmp_path / "v.mp4", 40)
    with FakeServer(models_of("lmdeploy")) as server:
        server.chat(stream_of("lmdeploy"))
        conv = connect(server)
        answer(conv.ask("What happens?", [conv.describe_video(video, 5)]))
        parts = server.chat_bodies()[0]["messages"][-1]["content"]
    pictures = [p["image_url"] for p in parts if p["type"] == "image_url"]
    assert [p["max_dynamic_patch"] for p in pictures] == [1] * 5
    mean = np.asarray(IMAGENET_MEAN)[:, None, None]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    numbers = []
    for p in pictures:
        rgb = np.asarray(Image.open(io.BytesIO(b64_of(p["url"]))).convert("RGB"), dtype=np.float32) / 255
        assert rgb.shape == (448, 448, 3)
        numbers.append(read_frame_number((rgb.transpose(2, 0, 1) - mean) / std))
    assert numbers == frame_indices(40, 30.0, 5)
    labels = [p["text"] for p in parts if p["type"] == "text"]
    assert labels == ["Frame1: ", "Frame2: ", "Frame3: ", "Frame4: ", "Frame5: ", "What happens?"]


def test_a_video_cut_short_sends_the_frames_it_holds_and_says_so_once(tmp_path):
    from internvl_chat.media.video_sampling import frame_indices

    whole = faststart_copy(write_numbered_video(tmp_path / "v.mp4", 40), tmp_path / "whole.mp4")
    cut = cut_at_frame(whole, tmp_path / "cut.mp4", 16)
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"), stream_of("vllm"))
        conv = connect(server)
        video = conv.describe_video(cut, 4)
        assert (video.cut_short, video.duration) == ((16, 40), pytest.approx(16 / 30))  # from its index, at attach
        _, final = answer(conv.ask("What happens?", [video]))
        assert final["notice"].startswith(f"{cut} holds only 16 of the 40 frames its header lists")
        _, final = answer(conv.ask("And then?"))
        assert final["notice"] is None
        clip = conv.turns[0].media[0].clip
    assert [_frame_number(p.url) for p in clip.frames] == frame_indices(16, 30.0, 4)


def test_an_mkv_cut_short_is_known_as_it_is_described_for_a_server(tmp_path):
    """As locally: its elements' headers tell the cut (not how many frames it holds) for the attach line."""
    whole = write_numbered_video(tmp_path / "v.mkv", 40)
    with FakeServer(models_of("vllm")) as server:
        conv = connect(server)
        video = conv.describe_video(cut_at_frame(whole, tmp_path / "cut.mkv", 16), 4)
        assert (video.ends_early, video.cut_short) == (True, None)
        assert not conv.describe_video(whole, 4).ends_early


def _frame_number(url: str) -> int:
    mean, std = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    rgb = np.asarray(Image.open(io.BytesIO(b64_of(url))).convert("RGB"), dtype=np.float32) / 255
    return read_frame_number((rgb.transpose(2, 0, 1) - mean) / std)


def test_a_video_range_past_the_end_is_kept_as_the_range_used(tmp_path):
    """As locally: an end past the clip is its end, in what is shown and saved; the same frames go."""
    video = write_numbered_video(tmp_path / "v.mp4", 40)  # 1.33 s at 30 fps
    with FakeServer(models_of("lmdeploy")) as server:
        conv = connect(server)
        media = conv.describe_video(video, 3, (0.5, 1000.0))
        assert media.video_range == (0.5, 1.34)
        server.chat(stream_of("lmdeploy"))
        answer(conv.ask("What happens?", [media]))
        conv.save(tmp_path / "s.json")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [m["range"] for msg in saved["messages"] for m in msg.get("media", [])] == [[0.5, 1.34]]


def _lmdeploy_renders(content) -> str:
    """lmdeploy's InternVL proc_messages: text parts as they are, each picture as `<img>…</img>\\n`."""
    return "".join(p["text"] if p["type"] == "text" else "<image>\n" for p in content)


def _llamacpp_renders(content) -> str:
    """llama.cpp: text parts concatenated, each picture a marker in place with nothing after it."""
    return "".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def _vllm_renders(content) -> str:
    """vLLM: text parts joined with \\n; placeholders already in the text stay where they are."""
    texts = [p["text"] for p in content if p["type"] == "text"]
    assert all(p["type"] in ("text", "image_url", "video_url") for p in content)
    return "\n".join(texts)


@pytest.mark.parametrize(
    ("dialect", "renders"), [("lmdeploy", _lmdeploy_renders), ("llamacpp", _llamacpp_renders), ("vllm", _vllm_renders)]
)
@pytest.mark.parametrize("images", [1, 3])
def test_each_server_builds_internvls_own_image_layout(tiny_loaded_tokenizer, dialect, renders, images):
    from internvl_chat.chat.dialects import Picture

    pictures = [Picture(f"data:image/png;base64,{n}", 12) for n in range(images)]
    content = user_content(dialect, "What is shown?", pictures, [])
    builder = PromptBuilder(tiny_loaded_tokenizer, None)
    full = builder.render_text("What is shown?", [MediaSpec("image", 1)] * images, first=True, expand_images=False)
    internvl = full.removeprefix("<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
    assert renders(content) == internvl


def test_the_other_dialects_shapes(tmp_path):
    from internvl_chat.chat.dialects import Clip, Picture, request_body

    pic = Picture("data:image/png;base64,AA==", 6)
    clip = Clip((Picture("data:image/jpeg;base64,F1", 1), Picture("data:image/jpeg;base64,F2", 1)))
    assert clip.video_url == "data:video/jpeg;base64,F1,F2"  # vLLM's VideoMediaIO "video/jpeg" form
    sglang = user_content("sglang", "Q", [pic], [clip])
    assert [p.get("image_url", {}).get("max_dynamic_patch") for p in sglang] == [6, 1, 1, None]
    ours = user_content("internvl-chat", "Q", [pic], [clip])
    assert ours == [
        {"type": "image_url", "image_url": {"url": pic.url, "max_dynamic_patch": 6}},
        {"type": "video_url", "video_url": {"url": clip.video_url}},
        {"type": "text", "text": "Q"},
    ]
    assert user_content("generic", "Q", [pic], []) == [{"type": "image_url", "image_url": {"url": pic.url}},
                                                       {"type": "text", "text": "\nQ"}]  # fmt: skip
    assert user_content("vllm", "just text", [], []) == "just text"
    params = SamplingParams(temperature=0.7, top_k=0, repetition_penalty=1.1, seed=3)
    body = request_body("internvl-chat", "m", [], params, [pic])
    assert (body["top_k"], body["seed"], body["mm_processor_kwargs"]) == (0, 3, {"max_dynamic_patch": 6})
    body = request_body("sglang", "m", [], params, [pic])
    assert body["top_k"] == -1 and "mm_processor_kwargs" not in body
    body = request_body("llamacpp", "m", [], params, [pic], 8192)
    assert (body["repeat_penalty"], body["repeat_last_n"], body["min_p"]) == (1.1, 8192, 0.0)
    assert "repeat_last_n" not in request_body("llamacpp", "m", [], params, [pic])  # no context known: its default
    body = request_body("generic", "m", [], params, [pic])
    assert "top_k" not in body and "repetition_penalty" not in body
    mixed = request_body("vllm", "m", [], params, [pic, Picture("data:,", 12)])
    assert "mm_processor_kwargs" not in mixed


def test_a_repetition_penalty_on_llama_cpp_covers_its_context_with_a_window_it_takes():
    """llama-server refuses `repeat_last_n: -1` (400 "Value must be between 0 <= value"), which older
    ones read as the whole context: every turn with a repetition penalty failed there. The window
    sent is the context the model list states."""
    with FakeServer(models_of("llamacpp")) as server:
        conv = connect(server)
        server.chat(stream_of("llamacpp"))
        answer(conv.ask("Hi.", params=SamplingParams(max_new_tokens=8, repetition_penalty=1.3)))
        body = server.chat_bodies()[-1]
        assert (body["repeat_penalty"], body["repeat_last_n"]) == (1.3, 8192)


def test_a_seed_for_llama_cpp_never_means_a_random_one():
    """llama.cpp keeps a seed's low 32 bits and takes 4294967295 for "random": `--seed 4294967295`,
    or the largest the app takes (2**63-1), gave another answer every time on a real llama-server."""
    from internvl_chat.chat.dialects import request_body

    for seed, sent in [(0, 0), (3, 3), (2**32 - 2, 2**32 - 2), (2**32 - 1, 0), (2**63 - 1, (2**63 - 1) % (2**32 - 1))]:
        body = request_body("llamacpp", "m", [], SamplingParams(seed=seed), [])
        assert body["seed"] == sent and 0 <= sent < 2**32 - 1, seed
        assert request_body("vllm", "m", [], SamplingParams(seed=seed), [])["seed"] == seed  # others: as given
    with FakeServer(models_of("llamacpp")) as server:
        conv = connect(server)
        server.chat(stream_of("llamacpp"))
        answer(conv.ask("Hi.", params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=2**63 - 1)))
        assert server.chat_bodies()[-1]["seed"] != 2**32 - 1 and server.chat_bodies()[-1]["seed"] < 2**32


# ---- streaming, usage, timings ------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["vllm", "lmdeploy", "llamacpp"])
@pytest.mark.parametrize("piece_size", [0, 3])
def test_a_streamed_answer_usage_and_server_timings(dialect, piece_size):
    with FakeServer(models_of(dialect)) as server:
        server.chat(stream_of(dialect, piece_size))
        conv = connect(server)
        text, final = answer(conv.ask("What is it?"))
        assert text == REPLY == conv.turns[0].answer_text == conv.turns[0].reply
        assert final["finish_reason"] == "stop" and final["token_ids"] is None
        assert final["usage"] == {"prompt_tokens": 1843, "completion_tokens": 5, "total_tokens": 1848, "cached_tokens": 1792}
        timing = final["timing"]
        assert timing["server"]["cached_tokens"] == 1792 and timing["decode_tokens"] == 4
        assert timing["ttft_s"] >= 0 and timing["decode_s"] >= 0
        if dialect == "llamacpp":
            assert timing["server"]["predicted_per_second"] == 81.43 and timing["server"]["cache_n"] == 1792
        assert conv.context_used == 1848  # the server's own count
        assert conv.turns[0].answer_tokens == 5
        body = server.chat_bodies()[0]
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_absurd_or_negative_usage_numbers_are_ignored():
    """A server's usage is trusted for the context shown and enforced, so a count that no request can
    have (negative, a boolean, beyond 2**31) is dropped rather than blocking every later turn."""
    usage = {"prompt_tokens": 10**30, "completion_tokens": -1, "total_tokens": True,
             "prompt_tokens_details": {"cached_tokens": -3}}  # fmt: skip
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}], "usage": usage}
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply.sse(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"))
        conv = connect(server)
        text, final = answer(conv.ask("hi"))
        assert text == "Hi." and final["usage"] is None
        assert 0 < conv.context_used < 100  # an estimate, so the next turn still fits
        conv.check_budget(10)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 2_000_000_000, "completion_tokens": 1},  # a prompt over the server's own 32,768-token context
    {"prompt_tokens": 12, "completion_tokens": 40_000},  # an answer of more tokens than the 64 asked for
])  # fmt: skip
def test_usage_no_answer_to_this_request_can_have_is_ignored(usage):
    """Counts below 2**31 can still be impossible for the request made: a prompt past the context
    the server states, or an answer past the max_tokens it was sent. Trusted, they made the context
    shown 12,207,031 % full and refused every later turn until /undo."""
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}], "usage": usage}
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply.sse(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"))
        conv = connect(server)
        text, final = answer(conv.ask("hi"))
        assert text == "Hi." and final["usage"] is None and conv.turns[0].usage is None
        assert 0 < conv.context_used < 100  # an estimate, so the next turn still fits
        conv.check_budget(10)


def test_cached_tokens_beyond_the_prompt_are_ignored_and_the_rest_kept():
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 5000}}
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}], "usage": usage}
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply.sse(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"))
        conv = connect(server)
        _, final = answer(conv.ask("hi"))
        assert final["usage"] == {"prompt_tokens": 12, "completion_tokens": 2}
        assert conv.context_used == 14


def test_absurd_server_timings_are_ignored_without_failing_the_answer():
    """llama.cpp's `timings` are shown in /stats and --json: a hostile server's integer too large for
    a float (math.isfinite raised OverflowError: a traceback) or its negative, NaN or huge values are dropped."""
    timings = (b'{"prompt_ms": 1' + b"0" * 400 + b', "predicted_ms": -5, "prompt_n": NaN, "predicted_n": 1e300,'
               b' "cache_n": true, "predicted_per_second": 81.5}')  # fmt: skip
    reply = Reply.sse(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}], '
                      b'"timings": ' + timings + b"}\n\ndata: [DONE]\n\n")  # fmt: skip
    with FakeServer(models_of("llamacpp")) as server:
        server.chat(reply)
        text, final = answer(connect(server).ask("hi"))
        assert text == "Hi." and final["timing"]["server"] == {"predicted_per_second": 81.5}
        json.dumps(final["timing"], allow_nan=False)  # --json prints it


@pytest.mark.parametrize("streamed", [True, False])
def test_a_lone_surrogate_in_an_answer_becomes_a_replacement_character(tmp_path, streamed):
    """JSON lets a server write "\\ud800", which decodes to no text: kept as is, the answer could be
    neither counted, resent (UTF-8), printed nor reloaded from its session file."""
    content = b'"a\\ud800b\\udfff"'
    if streamed:
        reply = Reply.sse(b'data: {"choices": [{"index": 0, "delta": {"content": ' + content + b'}}]}\n\n'
                          b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "odd\\udc80"}]}\n\ndata: [DONE]\n\n')  # fmt: skip
    else:
        reply = Reply.json(b'{"choices": [{"index": 0, "message": {"content": ' + content + b'}, "finish_reason": "stop"}]}')
    with FakeServer(models_of("vllm")) as server:
        server.chat(reply, stream_of("vllm"))
        conv = connect(server)
        text, final = answer(conv.ask("hi"))
        assert text == conv.turns[0].reply == "a\ufffdb\ufffd"
        json.dumps(final["timing"], ensure_ascii=False).encode()  # --json prints it (the finish_reason it names)
        assert conv.context_used > 0
        answer(conv.ask("and?"))  # the answer is resent
        assert server.chat_bodies()[1]["messages"][1]["content"] == "a\ufffdb\ufffd"
        conv.save(tmp_path / "s.json")
        conv.load(tmp_path / "s.json")
        assert conv.turns[0].reply == "a\ufffdb\ufffd"


def test_a_long_finish_reason_is_kept_short():
    """/stats and --json show a finish_reason the server invents; a hostile one can be megabytes."""
    reply = Reply.sse(b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\n'
                      b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "' + b"x" * 100_000 + b'"}]}\n\n'
                      b"data: [DONE]\n\n")  # fmt: skip
    with FakeServer(models_of("vllm")) as server:
        server.chat(reply)
        text, final = answer(connect(server).ask("hi"))
        assert text == "ok" and final["finish_reason"] == "stop"
        assert final["timing"]["server"]["finish_reason"] == "x" * 64


def test_stream_interval_groups_pieces_without_changing_the_text():
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"), stream_of("vllm"))
        conv = connect(server)
        one = list(conv.ask("a"))
        conv.stream_interval = 2
        two = list(conv.ask("b"))
        assert "".join(e["text"] for e in one) == "".join(e["text"] for e in two) == REPLY
        assert len([e for e in two if e["text"]]) < len([e for e in one if e["text"]])


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_server_that_ignores_stream_true_still_answers(content_type):
    """Some servers (and proxies) send the whole completion under the event stream's type: it read as
    a stream that closed before the answer finished."""
    completion = {"id": "x", "object": "chat.completion", "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole."}, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}  # fmt: skip
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply(200, [json.dumps(completion).encode()], content_type))
        conv = connect(server)
        text, final = answer(conv.ask("hi"))
        assert (text, final["finish_reason"], conv.context_used) == ("Whole.", "length", 11)


# ---- cancel, retry, undo, system ----------------------------------------------------------------


def test_cancel_closes_the_stream_and_keeps_the_partial_answer():
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"), stream_of("vllm"))
        conv = connect(server)
        cancel = threading.Event()
        events = conv.ask("What is it?", cancel=cancel)
        first = next(events)
        assert first["text"] == "A red"
        cancel.set()
        rest = list(events)
        assert rest[-1]["finish_reason"] == "cancelled"
        turn = conv.turns[0]
        assert turn.reply == "A red" and turn.answer_text == "A red [cancelled]"
        answer(conv.ask("Go on."))
        history = server.chat_bodies()[1]["messages"]
        assert history[1] == {"role": "assistant", "content": "A red"}  # resent exactly, no marker


SILENT_SERVER_TIMEOUT_S = 30.0  # without the abort, a cancel waited this long and ended in a timeout error


def _blocked_signals(thread: threading.Thread) -> set[int]:
    """The signals a thread blocks, as the kernel says (Linux)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as file:
        status = file.read()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def _blocked_reading(thread_id: int) -> bool:
    """Whether the thread waits inside httpcore's socket read (a server gone silent)."""
    frame = sys._current_frames().get(thread_id)
    return frame is not None and frame.f_code.co_name == "read" and "httpcore" in frame.f_code.co_filename


def test_cancel_ends_an_answer_whose_server_went_silent_and_keeps_it():
    """The answer loop looks at the cancel flag between pieces; a server that sends nothing more
    used to hold the first Ctrl-C until the read timed out (and then lost the answer)."""
    role, words = fixture("vllm/stream.sse").split(b"\n\n")[:2]
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply(pieces=[role + b"\n\n" + words + b"\n\n"], end="hang"), stream_of("vllm"))
        conv = connect(server, timeout=SILENT_SERVER_TIMEOUT_S)
        cancel = threading.Event()
        events = conv.ask("What is it?", cancel=cancel)
        assert next(events)["text"] == "A red"
        reader = threading.get_ident()
        (watcher,) = [t for t in threading.enumerate() if t.name == "remote-watch" and t.is_alive()]
        if sys.platform.startswith("linux"):
            assert signal.SIGINT in _blocked_signals(watcher)  # a Ctrl-C goes to the reading thread

        def cancel_once_blocked() -> None:
            while not _blocked_reading(reader):
                time.sleep(0.01)
            cancel.set()

        threading.Thread(target=cancel_once_blocked, daemon=True).start()
        rest_events = list(events)
        assert rest_events[-1]["finish_reason"] == "cancelled"
        assert conv.turns[0].answer_text == "A red [cancelled]"
        text, final = answer(conv.ask("Go on."))  # the pooled connection was not the shut one
        assert final["finish_reason"] == "stop" and text


def test_a_cancel_that_comes_before_the_answers_head_still_ends_it():
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply(pieces=[], end="hang"), stream_of("vllm"))
        conv = connect(server, timeout=SILENT_SERVER_TIMEOUT_S)
        cancel = threading.Event()
        trace = conv.client.trace

        def spy(event: str, info: dict) -> None:
            trace(event, info)
            if event == "http11.send_request_body.complete":  # the request is sent, its head awaited
                cancel.set()

        conv.client.trace = spy
        text, final = answer(conv.ask("What is it?", cancel=cancel))
        assert (text, final["finish_reason"], conv.turns[0].answer_text) == ("", "cancelled", "[cancelled]")
        assert answer(conv.ask("Go on."))[1]["finish_reason"] == "stop"


@pytest.mark.parametrize("when", ["at-the-next-piece", "while-reading"])
def test_a_cancel_after_the_server_finished_the_answer_keeps_it_whole(when):
    """The server said finish_reason stop and left the stream open (the usage or [DONE] still to
    come): a Ctrl-C then cut nothing, but the answer was saved as cancelled, marked [cancelled]."""
    done = b'data: {"choices": [{"index": 0, "delta": {"content": "Whole."}, "finish_reason": "stop"}]}\n\n'
    with FakeServer(models_of("vllm")) as server:
        server.chat(Reply(pieces=[done], end="hang"))
        conv = connect(server, timeout=SILENT_SERVER_TIMEOUT_S)
        cancel = threading.Event()
        events = conv.ask("What is it?", cancel=cancel)
        assert next(events)["text"] == "Whole."
        if when == "while-reading":  # the loop reads on; the watcher's abort ends that read
            reader = threading.get_ident()

            def cancel_once_blocked() -> None:
                while not _blocked_reading(reader):
                    time.sleep(0.01)
                cancel.set()

            threading.Thread(target=cancel_once_blocked, daemon=True).start()
        else:
            cancel.set()
        final = list(events)[-1]
        assert (final["finish_reason"], conv.turns[0].answer_text) == ("stop", "Whole.")


def test_an_abandoned_stream_leaves_the_conversation_unchanged():
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server)
        events = conv.ask("What is it?")
        next(events)
        events.close()  # what Ctrl-C before the end does to the generator
        assert conv.turns == []


def test_retry_replaces_the_last_answer_and_a_failed_retry_keeps_it():
    with FakeServer(models_of("lmdeploy")) as server:
        server.chat(stream_of("lmdeploy"), Reply.json({"message": "busy", "type": "server_error", "code": 503,
                                                        "object": "error"}, 503), stream_of("lmdeploy"))  # fmt: skip
        conv = connect(server)
        answer(conv.ask("Q1"))
        before = conv.turns[0]
        with pytest.raises(Exception, match="503"):
            answer(conv.retry())
        assert conv.turns == [before]
        answer(conv.retry())
        assert len(conv.turns) == 1 and conv.turns[0] is not before
        bodies = server.chat_bodies()
        assert bodies[2]["messages"] == [{"role": "user", "content": "Q1"}]  # the old answer is not sent


def test_undo_clear_and_system_change_what_is_resent():
    with FakeServer(models_of("vllm")) as server:
        server.chat(*(stream_of("vllm") for _ in range(4)))
        conv = connect(server)
        answer(conv.ask("Q1"))
        answer(conv.ask("Q2"))
        assert conv.undo().user_text == "Q2"
        conv.set_system("Be brief.")
        answer(conv.ask("Q3"))
        assert [m["content"] for m in server.chat_bodies()[2]["messages"]] == ["Be brief.", "Q1", REPLY, "Q3"]
        conv.clear()
        conv.set_system(None)
        answer(conv.ask("Q4"))
        assert server.chat_bodies()[3]["messages"] == [{"role": "user", "content": "Q4"}]
        with pytest.raises(UsageError):
            conv.clear() or conv.undo() or conv.undo()


def test_a_long_conversation_with_failures_holds_one_connection_and_close_leaves_none():
    """Every turn's connection is closed or pooled, whatever ended it (a server error, a cut or
    reset stream, a cancel of a silent server, a page, a retry): a long session holds at most the
    pooled one, none is left for the garbage collector (a ResourceWarning), and close() ends it."""
    role, words = fixture("vllm/stream.sse").split(b"\n\n")[:2]
    begun = role + b"\n\n" + words + b"\n\n"
    replies = [stream_of("vllm"), Reply.json({"error": {"message": "boom"}}, 500), Reply.json({"error": {"message": "no"}}, 400),
               Reply(pieces=[begun], end="cut"), Reply(pieces=[begun], end="reset"), Reply(pieces=[begun], end="hang"),
               Reply(pieces=[b"<html><title>proxy</title></html>"], content_type="text/html"), stream_of("vllm")]  # fmt: skip
    gc.collect()  # an earlier test's socket collected in here, to a server that had this one's port, is not this one's
    with FakeServer(models_of("vllm")) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        conv = connect(server, timeout=SILENT_SERVER_TIMEOUT_S)
        for reply in replies:
            server.chat(reply)
            cancel = threading.Event()
            try:
                for event in conv.ask("What is it?", cancel=cancel):
                    cancel.set()  # a cancel after the first piece: the hanging reply's ends here
            except RemoteError:
                pass
        server.chat(stream_of("vllm"))
        answer(conv.retry())
        gc.collect()
        open_sockets = [s for s in list(conv.client._sockets) if s.fileno() != -1]
        assert len(open_sockets) <= 1, open_sockets
        conv.close()
        assert [s for s in list(conv.client._sockets) if s.fileno() != -1] == []
        client_end = f"raddr=('127.0.0.1', {server.url.split(':')[2].split('/')[0]})"  # the client's sockets, not the server's
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and client_end in str(w.message)]
        assert leaked == []


def test_answers_that_end_well_share_one_connection_and_any_other_ending_closes_its_own(monkeypatch, kept_connections):
    """After `data: [DONE]` the end of the body (the chunked encoding's last chunk) is read, so the
    connection goes back to the pool: the client stopped at [DONE], and every turn made a new TCP
    (and TLS) connection, one to three round trips before each answer from a distant server. A
    turn that ends any other way closes its connection: the next one makes a new one."""
    role, words = fixture("vllm/stream.sse").split(b"\n\n")[:2]
    begun = role + b"\n\n" + words + b"\n\n"
    good = fixture("vllm/stream.sse")
    finished = good.split(b"data: [DONE]")[0]  # the finish_reason and the usage, no [DONE]
    with FakeServer(models_of("vllm")) as server:
        conv = connect(server, timeout=SILENT_SERVER_TIMEOUT_S)

        def turn(reply: Reply, cancel_at_first: bool = False) -> dict | None:
            server.chat(reply)
            cancel = threading.Event()
            try:
                for event in conv.ask("What is it?", cancel=cancel):
                    if cancel_at_first:
                        cancel.set()
                return event
            except RemoteError:
                return None

        def well_ended(connections: int) -> None:
            for _ in range(3):
                assert turn(stream_of("vllm"))["finish_reason"] == "stop"
                assert server.connections == connections  # the pooled one, made anew only after a bad ending

        well_ended(1)  # the model list's connection, then the answers'
        turn(Reply(pieces=[begun], end="cut"))
        well_ended(2)
        turn(Reply(pieces=[begun], end="hang"), cancel_at_first=True)
        well_ended(3)
        turn(Reply.sse(begun + b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n'))  # an error mid-stream
        well_ended(4)
        # more after [DONE] than the end of a body: left unread, closed
        assert turn(Reply(pieces=[good, b": " + b"x" * remote_stream.DRAIN_BYTES + b"\n\n"]))["finish_reason"] == "stop"
        well_ended(5)
        monkeypatch.setattr(remote_stream, "DRAIN_S", 0.01)
        assert turn(Reply(pieces=[good], end="hang"))["finish_reason"] == "stop"  # [DONE], then no end: closed
        monkeypatch.setattr(remote_stream, "DRAIN_S", 600.0)
        well_ended(6)
        monkeypatch.setattr(remote, "FINISHED_GRACE_S", 0.01)
        assert turn(Reply(pieces=[finished], end="hang"))["finish_reason"] == "stop"  # finished, then silence: the grace
        monkeypatch.setattr(remote, "FINISHED_GRACE_S", 600.0)  # as kept_connections pins it
        well_ended(7)
        conv.close()
        assert [s for s in list(conv.client._sockets) if s.fileno() != -1] == []


@pytest.mark.parametrize("end", ["drop", "drop-reset"])
def test_a_request_on_a_kept_connection_the_server_closes_is_sent_again_on_a_new_one(end, kept_connections):
    """A server (or proxy) whose idle timeout is shorter than the client's, or that closes the kept
    connection just as the next request arrives, answered nothing: the turn failed ("disconnected
    without sending a response", or a reset) for nothing. Sent once more, on a new connection."""
    with FakeServer(models_of("vllm")) as server:
        conv = connect(server)  # the model list's connection stays in the pool
        server.chat(Reply(end=end), stream_of("vllm"))
        text, last = answer(conv.ask("What is it?"))
        assert last["finish_reason"] == "stop" and text
        assert server.connections == 2
        first, again = server.chat_bodies()
        assert first == again
        assert not conv.client.broke  # no reason to read the model list again
        server.replies["/v1/models"].append(Reply(end=end))  # the answer's connection, kept, then closed
        assert [m["id"] for m in conv.client.models()] == [m["id"] for m in json.loads(models_of("vllm"))["data"]]
        assert server.connections == 3
        conv.close()


@pytest.mark.parametrize("end", ["drop", "drop-reset"])
def test_a_new_connection_closed_without_an_answer_is_not_tried_again(end):
    """Only a kept connection may have been closed by the server while idle: on a new one, no
    answer is the server's own failure, said as before."""
    with FakeServer(models_of("vllm")) as server:
        client = remote_http.ApiClient(server.url)
        server.chat(Reply(end=end), stream_of("vllm"))
        with pytest.raises(RemoteError, match=r"^the connection to .* broke before the answer began \(.*\); ask again$"):
            list(client.stream_chat({"model": "m", "messages": []}))
        assert server.connections == 1 and len(server.chat_bodies()) == 1
        client.close()


def test_a_kept_connection_that_breaks_after_the_answer_began_is_not_tried_again(kept_connections):
    role, words = fixture("vllm/stream.sse").split(b"\n\n")[:2]
    with FakeServer(models_of("vllm")) as server:
        conv = connect(server)
        server.chat(Reply(pieces=[role + b"\n\n" + words + b"\n\n"], end="cut"), stream_of("vllm"))
        events = list(conv.ask("What is it?"))
        assert events[-1]["finish_reason"] == "error"
        assert server.connections == 1 and len(server.chat_bodies()) == 1
        conv.close()


# ---- budget and tiles ---------------------------------------------------------------------------


def test_costs_are_estimates_and_the_servers_context_is_enforced(tmp_path):
    models = json.loads(models_of("vllm"))
    models["data"][0]["max_model_len"] = 800
    with FakeServer(json.dumps(models).encode()) as server:
        conv = connect(server)
        assert conv.token_counts_exact is False
        image = conv.describe_image(png(tmp_path / "wide.png", (896, 448)), 6)
        assert image.tiles == 3  # 2×1 grid + thumbnail, InternVL's tiling
        assert conv.media_tokens([image]) == 3 * 256 + 3
        assert conv.turn_tokens([image]) > conv.media_tokens([image])
        with pytest.raises(ContextOverflowError, match="800-token context"):
            conv.check_attach([image])
        conv.check_attach([])
        items = conv.context_items([image])
        assert items[-1] == ("reserved for the answer (max_new_tokens)", 64)



def test_llama_cpp_pictures_are_counted_as_llama_cpp_slices_them(tmp_path):
    """llama.cpp slices an InternVL picture its own way (llava-1.6 style, plus an overview; no tile
    limit is sent): a 640×400 picture is 3 tiles there (800 prompt tokens on a real llama-server
    with the demo model), 7 for InternVL. Counted as InternVL's, a 1,024-token llama-server had
    the REPL refuse to attach a picture that the server takes."""
    from internvl_chat.chat.dialects import llamacpp_tiles

    # grids read off a real llama-server (the prompt tokens of each picture, 256 a tile)
    for size, tiles in [((100, 100), 1), ((448, 448), 1), ((640, 400), 3), ((448, 449), 3), ((449, 449), 5),
                        ((1000, 300), 4), ((2000, 2000), 10), ((1920, 1080), 13), ((1344, 896), 7)]:  # fmt: skip
        assert llamacpp_tiles(*size) == tiles, size
    models = json.loads(models_of("llamacpp"))
    models["data"][0]["meta"]["n_ctx"] = 1024
    with FakeServer(json.dumps(models).encode()) as server:
        conv = connect(server)
        image = conv.describe_image(png(tmp_path / "scene.png", (640, 400)))
        assert image.tiles == 7  # InternVL's own count, which a saved session keeps
        assert conv.media_tokens([image]) == 3 * 256 + 3
        conv.check_attach([image])  # 771 tokens fit in 1,024
        big = conv.describe_image(png(tmp_path / "big.png", (1920, 1080)))
        with pytest.raises(ContextOverflowError, match="1,024-token context"):
            conv.check_attach([big])  # 13 tiles there


def test_llama_cpp_tiles_follow_its_single_precision_arithmetic():
    """llama.cpp scales each candidate grid in `float` (select_best_resolution): the estimate, in
    double precision, named 13 tiles for a 4276×4275 picture that a real llama-server made 10 of
    (2,562 prompt tokens), and 9 for a 2723×5448 one it made 11 of."""
    from internvl_chat.chat.dialects import llamacpp_tiles

    # read off a real llama-server with the demo model (prompt tokens less a text-only request, 256 a tile)
    for size, tiles in [((4276, 4275), 10), ((2723, 5448), 11), ((3049, 6095), 9), ((6651, 3324), 11),
                        ((1, 5000), 13), ((5000, 1), 13), ((449, 1), 3)]:  # fmt: skip
        assert llamacpp_tiles(*size) == tiles, size


def test_llama_cpp_refusals_do_not_advise_a_tile_limit_it_ignores(tmp_path):
    """llama.cpp takes no tile limit (it tiles its own way): "use fewer tiles (--max-tiles)" changed
    nothing there, and the same refusal came back. Smaller pictures (448×448: one tile) do help."""
    models = json.loads(models_of("llamacpp"))
    models["data"][0]["meta"]["n_ctx"] = 1024
    with FakeServer(json.dumps(models).encode()) as server:
        conv = connect(server)
        big = conv.describe_image(png(tmp_path / "big.png", (1920, 1080)), 1)
        with pytest.raises(ContextOverflowError, match=r"; use fewer or smaller pictures, or fewer frames, or a smaller "
                           r"max_new_tokens$"):  # fmt: skip
            conv.check_attach([big])
        conv.commands = False
        with pytest.raises(ContextOverflowError, match=r"; use fewer or smaller pictures, or fewer frames \(--frames\), "
                           r"or a smaller --max-new-tokens$"):  # fmt: skip
            conv.check_attach([big])


def test_the_context_advice_names_clear_only_when_there_are_turns_and_flags_in_one_shot_mode(tmp_path):
    """/clear frees nothing before the first turn, and one-shot mode has no commands at all: it
    names the flags of the next run instead (as the local Session does)."""
    models = json.loads(models_of("vllm"))
    models["data"][0]["max_model_len"] = 800
    with FakeServer(json.dumps(models).encode()) as server:
        conv = connect(server)
        image = conv.describe_image(png(tmp_path / "wide.png", (896, 448)), 6)
        with pytest.raises(ContextOverflowError, match=r"context; use fewer tiles or frames, or a smaller max_new_tokens$"):
            conv.check_attach([image])
        conv.commands = False
        with pytest.raises(ContextOverflowError, match=r"context; use fewer tiles or frames \(--max-tiles, --frames\), "
                           r"or a smaller --max-new-tokens$"):  # fmt: skip
            conv.check_attach([image])
        conv.commands = True
        server.chat(stream_of("vllm"))
        answer(conv.ask("Hi."))
        with pytest.raises(ContextOverflowError, match=r"; use fewer tiles or frames, /clear, or a smaller max_new_tokens$"):
            conv.check_attach([image])


def test_context_items_add_up_to_the_servers_count_and_a_cancelled_answer_keeps_it():
    """The server counts more than the client can estimate (its default system message, its
    template): /context's items still add up to the context used, and an answer the server did not
    count (cancelled: no usage) adds its estimate to the last count instead of dropping it."""
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"), stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("What is it?"))  # the server says 1,843 + 5 tokens; the estimate is ~20
        items = conv.context_items([])
        assert sum(tokens for _, tokens in items) == 1848 + 10 + 64  # used, next template, answer reserve
        assert "the server's count beyond these estimates" in items[1][0]
        cancel = threading.Event()
        events = conv.ask("Go on.", cancel=cancel)
        next(events)
        cancel.set()
        assert list(events)[-1]["finish_reason"] == "cancelled" and conv.turns[1].usage is None
        assert conv.context_used == 1848 + conv._turn_total(conv.turns[1])
        assert sum(tokens for _, tokens in conv.context_items([])) == conv.context_used + 10 + 64


def test_vllm_takes_one_tile_limit_per_request(tmp_path):
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("a", [conv.describe_image(png(tmp_path / "a.png"), 6)]))
        with pytest.raises(UsageError, match="max_tiles 6"):
            conv.describe_image(png(tmp_path / "b.png"), 12)
        conv.describe_image(tmp_path / "b.png", 6)


# ---- pictures that servers would read differently ------------------------------------------------


def test_exif_rotation_and_transparency_are_sent_as_we_see_them(tmp_path):
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (80, 40), (10, 200, 10)).save(rotated, exif=exif)
    clear = png(tmp_path / "clear.png", (20, 20), (0, 0, 0, 0), mode="RGBA")
    with FakeServer(models_of("lmdeploy")) as server:
        server.chat(stream_of("lmdeploy"))
        conv = connect(server)
        media = [conv.describe_image(rotated), conv.describe_image(clear)]
        answer(conv.ask("?", media))
    upright = Image.open(io.BytesIO(b64_of(media[0].picture.url)))
    assert media[0].picture.url.startswith("data:image/png") and upright.size == (40, 80) == media[0].size
    white = Image.open(io.BytesIO(b64_of(media[1].picture.url)))
    assert white.mode == "RGB" and white.getpixel((5, 5)) == (255, 255, 255)


def test_an_rgb_pngs_transparent_colour_is_sent_white_as_we_see_it():
    """An 8-bit RGB PNG with a tRNS colour key went out still keyed (a server that ignores the key, as
    the published `.convert("RGB")` does, read the colour under it); it goes as the picture load_image
    sees, the keyed pixels white and no transparency left."""
    from internvl_chat.chat.remote_media import image_payload

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (10, 20, 30)  # the key
    rgb[:, 4:] = (200, 100, 50)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", transparency=(10, 20, 30))
    data, mime = image_payload(out.getvalue(), "key.png")
    sent = Image.open(io.BytesIO(data))
    assert mime == "image/png" and sent.mode == "RGB" and "transparency" not in sent.info
    assert sent.getpixel((1, 1)) == (255, 255, 255) and sent.getpixel((6, 6)) == (200, 100, 50)


def test_a_sixteen_bit_rgb_pngs_transparent_colour_is_sent_white_as_we_see_it(tmp_path):
    """A 16-bit RGB PNG with a tRNS colour key: Pillow reads its pixels' high bytes and keeps the key
    in 16 bits, which to_rgb compared with the 8-bit pixels as their low bytes: the picture sent made
    white the pixels whose values are the key's low bytes, (0x34, 0xCD, 0x00) here, and left the
    keyed ones their colour. It goes as load_image sees it: only the exact colour white."""
    import struct
    import zlib

    from internvl_chat.chat.remote_media import image_payload
    from internvl_chat.media.image import load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    key, other, low_bytes = (0x1234, 0xABCD, 0x0000), (0x0102, 0x0304, 0x0506), (0x3400, 0xCD00, 0x0000)
    row = b"\0" + b"".join(struct.pack(">HHH", *colour) for colour in [other] * 6 + [key] * 6 + [low_bytes] * 6)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 18, 10, 16, 2, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(row * 10)) + chunk(b"IEND", b""))  # fmt: skip
    data, mime = image_payload(png, "deep_key.png")
    sent = np.asarray(Image.open(io.BytesIO(data)))
    assert mime == "image/png" and sent.shape == (10, 18, 3)
    assert (sent[:, :6] == (1, 3, 5)).all() and (sent[:, 6:12] == 255).all() and (sent[:, 12:] == (0x34, 0xCD, 0)).all()
    path = tmp_path / "deep_key.png"
    path.write_bytes(png)
    assert np.array_equal(load_image(path).pixel_values.numpy(), load_image(_written(tmp_path / "sent.png", data)).pixel_values.numpy())


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_changed_or_broken_image_is_one_media_error(tmp_path):
    path = png(tmp_path / "a.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes((tmp_path / "a.png").read_bytes()[:40])
    with FakeServer(models_of("vllm")) as server:
        conv = connect(server)
        media = conv.describe_image(path)
        media.sha256 = "0" * 64  # attached, then the file changed
        with pytest.raises(MediaError, match="has changed"):
            list(conv.ask("?", [media]))
        with pytest.raises(MediaError):
            list(conv.ask("?", [conv.describe_image(broken)]))
        assert conv.turns == [] and server.chat_bodies() == []


# ---- save and load ------------------------------------------------------------------------------


def test_save_and_load_resend_the_same_bytes(tmp_path):
    video = write_numbered_video(tmp_path / "v.mp4", 12)
    image = png(tmp_path / "a.png")
    with FakeServer(models_of("lmdeploy")) as server:
        server.chat(*(stream_of("lmdeploy") for _ in range(4)))
        conv = connect(server, system_message="Be brief.")
        answer(conv.ask("Look.", [conv.describe_image(image, 4), conv.describe_video(video, 3, (0.0, 0.3))]))
        cancel = threading.Event()
        events = conv.ask("More?", cancel=cancel)
        next(events)
        cancel.set()
        list(events)
        saved = conv.save(tmp_path / "s.json", {"remote": {"api_key": "***"}})
        data = json.loads(saved.read_text())
        assert data["backend"] == {"kind": "remote", "server": server.url, "model": conv.model, "dialect": "lmdeploy"}
        other = connect(server)
        other.load(saved)
        assert other.system_message == "Be brief." and [t.answer_text for t in other.turns] == [REPLY, "A red [cancelled]"]
        answer(conv.ask("Next."))
        answer(other.ask("Next."))
        first, second = server.chat_bodies()[-2:]
        assert first["messages"] == second["messages"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "something else"}', "is not an internvl-chat session file"),
        ('{"format": "internvl-chat-session", "version": 99}', "version 99"),
        ('{"format": "internvl-chat-session", "version": 1, "messages": [{"role": "user", "text": "a"}]}', "a question without its answer"),
        ('{"format": "internvl-chat-session", "version": 1, "messages": [{"role": "user", "text": 1}, '
         '{"role": "assistant", "text": "b"}]}', "message 1"),
        ('{"format": "internvl-chat-session", "version": 1, "backend": "x"}', "backend"),
        ('{"format": "internvl-chat-session", "version": 1, "messages": [{"role": "user", "text": "a", "media": '
         '[{"kind": "image", "path": "x.png", "tiles": 0}]}, {"role": "assistant", "text": "b"}]}', "tiles must be"),
        ('{"format": "internvl-chat-session", "version": 1, "messages": [{"role": "user", "text": "a"}, '
         '{"role": "assistant", "text": "b", "finish_reason": "exploded"}]}', "finish_reason"),
    ],
)
def test_a_damaged_session_file_is_one_line_and_changes_nothing(tmp_path, text, message):
    path = tmp_path / "s.json"
    path.write_text(text)
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("kept"))
        with pytest.raises(UsageError, match=message) as err:
            conv.load(path)
        assert "\n" not in str(err.value)
        assert [t.user_text for t in conv.turns] == ["kept"]


def test_loading_a_session_whose_files_vanished_or_changed(tmp_path):
    image = png(tmp_path / "a.png")
    with FakeServer(models_of("vllm")) as server:
        server.chat(stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("Look.", [conv.describe_image(image)]))
        saved = conv.save(tmp_path / "s.json")
        png(tmp_path / "a.png", color=(1, 2, 3))
        with pytest.raises(MediaError, match="has changed since the session was saved"):
            connect(server).load(saved)
        (tmp_path / "a.png").unlink()
        with pytest.raises(MediaError, match="has vanished"):
            connect(server).load(saved)


def test_a_session_with_pictures_loads_on_llama_cpp_counted_as_llama_cpp_slices_them(tmp_path):
    """/load of any session holding a picture failed on llama.cpp with "'SavedMedia' object has no
    attribute 'size'": the saved pictures' cheap context bound asked for llama.cpp's tiles of a
    picture whose saved size was dropped. The bound counts the tiles llama.cpp makes of the saved
    size: a 1920×1080 picture is 13 tiles there, 9 for InternVL (max_tiles 8)."""
    image = png(tmp_path / "big.png", (1920, 1080))
    models = json.loads(models_of("llamacpp"))
    with FakeServer(json.dumps(models).encode()) as server:
        server.chat(stream_of("llamacpp"))
        conv = connect(server)
        picture = conv.describe_image(image, 8)
        assert picture.tiles == 9
        answer(conv.ask("Look.", [picture]))
        saved = conv.save(tmp_path / "s.json")
        loaded = connect(server)
        loaded.load(saved)
        assert loaded.media_tokens(loaded.turns[0].media) == 13 * 256 + 3
    models["data"][0]["meta"]["n_ctx"] = 3000  # over InternVL's 9 tiles (2,307 tokens), under llama.cpp's 13
    with FakeServer(json.dumps(models).encode()) as server:
        with pytest.raises(ContextOverflowError, match=r"needs more than 3,331 tokens for its media"):
            connect(server).read_saved(saved)


def test_skip_missing_loads_a_session_without_its_vanished_picture_and_resends_the_note(tmp_path):
    """The remote conversation loads through the same saved_media: the refusal by default, and with
    skip_missing the turn without its picture, its text noting the gap in what is resent."""
    first, second = png(tmp_path / "a.png"), png(tmp_path / "b.png", color=(1, 2, 3))
    with FakeServer(models_of("vllm")) as server:
        for _ in range(3):
            server.chat(stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("Look.", [conv.describe_image(first)]))
        answer(conv.ask("And here.", [conv.describe_image(second)]))
        saved = conv.save(tmp_path / "s.json")
        (tmp_path / "a.png").unlink()
        with pytest.raises(MediaError, match="a.png has vanished; put the files back, add --skip-missing"):
            connect(server).load(saved)
        loaded = connect(server)
        readied = loaded.read_saved(saved, skip_missing=True)
        assert [(m.turn, m.name, m.found) for m in readied.left_out] == [(1, "a.png", False)]
        loaded.restore(readied)
        assert [t.user_text for t in loaded.turns] == ["[image a.png was not found]\nLook.", "And here."]
        assert [len(t.media) for t in loaded.turns] == [0, 1]
        answer(loaded.ask("Next."))
        sent = server.chat_bodies()[-1]["messages"]
        assert sent[0] == {"role": "user", "content": "[image a.png was not found]\nLook."}
        assert b64_of(sent[2]["content"][1]["image_url"]["url"]) == Path(second).read_bytes()
        again = loaded.save(tmp_path / "again.json")
        assert [m["media"] for m in json.loads(again.read_text())["messages"][::2]][0] == []


def test_a_picture_saved_in_many_turns_is_read_once_and_refused_by_a_context_it_cannot_fit(tmp_path):
    """A session file naming one picture in hundreds of turns made a remote /load read it and hold
    its data URL once per turn (gigabytes from a small file), even for a server whose known context
    could never take those pictures."""
    image = png(tmp_path / "a.png")
    with FakeServer(models_of("lmdeploy")) as server:  # its context is not known
        server.chat(stream_of("lmdeploy"))
        conv = connect(server)
        answer(conv.ask("Look.", [conv.describe_image(image)]))
        data = json.loads(conv.save(tmp_path / "s.json").read_text())
        data["messages"] = data["messages"][:2] * 300
        (tmp_path / "many.json").write_text(json.dumps(data))
        loaded = connect(server)
        loaded.load(tmp_path / "many.json")
        assert len(loaded.turns) == 300 and len({id(t.media[0].picture) for t in loaded.turns}) == 1
    with FakeServer(models_of("vllm")) as server:  # a 32,768-token context: 300 pictures need ~77,000
        server.chat(stream_of("vllm"))
        conv = connect(server)
        answer(conv.ask("kept"))
        with pytest.raises(ContextOverflowError, match=r"needs more than [0-9,]+ tokens for its media, over the "
                                                       r"server's 32,768-token context") as err:  # fmt: skip
            conv.load(tmp_path / "many.json")
        assert "\n" not in str(err.value) and [t.user_text for t in conv.turns] == ["kept"]


def test_a_local_session_loads_and_its_texts_are_what_is_resent(tmp_path):
    """A session saved by the local app (ids, the " [cancelled]" mark) continues on a server from its texts."""
    image = png(tmp_path / "a.png")
    sha = __import__("hashlib").sha256(Path(image).read_bytes()).hexdigest()
    local = {
        "format": "internvl-chat-session", "version": 1, "backend": {"kind": "local"}, "model": "/models/tiny",
        "system_message": "Be brief.", "settings": {},
        "messages": [
            {"role": "user", "text": "Look.", "media": [{"kind": "image", "path": image, "sha256": sha, "tiles": 13,
                                                         "max_tiles": 12, "size": [64, 48]}]},
            {"role": "assistant", "text": "A red box.", "token_ids": [5, 6, 7], "finish_reason": "stop"},
            {"role": "user", "text": "More?", "media": []},
            {"role": "assistant", "text": "It is [cancelled]", "token_ids": [8, 9], "finish_reason": "cancelled"},
        ],
    }  # fmt: skip
    (tmp_path / "l.json").write_text(json.dumps(local))
    with FakeServer(models_of("lmdeploy")) as server:
        server.chat(stream_of("lmdeploy"))
        conv = connect(server)
        conv.load(tmp_path / "l.json")
        assert [t.reply for t in conv.turns] == ["A red box.", "It is"]
        assert conv.turns[1].answer_text == "It is [cancelled]" and conv.system_message == "Be brief."
        answer(conv.ask("Next."))
        sent = server.chat_bodies()[-1]["messages"]
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert [sent[2]["content"], sent[4]["content"]] == ["A red box.", "It is"]
        assert b64_of(sent[1]["content"][0]["image_url"]["url"]) == Path(image).read_bytes()


@pytest.mark.parametrize("kind", ["TIFF", "PNG with eXIf after the pixels", "JPEG"])
def test_a_server_is_sent_the_picture_the_way_up_the_local_model_sees_it(tmp_path, kind):
    """The remote payload turns a picture as load_image does: a TIFF once (Pillow opens it turned:
    turning it again sent it upside down), a PNG whose eXIf follows its pixels not at all (the
    documented exception), a JPEG by its EXIF orientation."""
    from internvl_chat.chat.remote_media import image_payload
    from internvl_chat.media.image import load_image

    stored = textured_rgb(64, 32, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / {"TIFF": "scan.tif", "JPEG": "photo.jpg"}.get(kind, "late.png")
    if kind == "PNG with eXIf after the pixels":
        path.write_bytes(png_with_exif_after_pixels(stored, 6))
    else:
        Image.fromarray(stored).save(path, exif=exif.tobytes(), **({"quality": 100} if kind == "JPEG" else {}))
    payload, _ = image_payload(path.read_bytes(), path.name)
    with Image.open(io.BytesIO(payload)) as sent:
        assert sent.size == load_image(path).size
    assert b"eXIf" not in payload  # nor a chunk a server might apply


def test_a_qoi_for_a_server_is_decoded_as_the_app_decodes_it(monkeypatch):
    """A QOI is sent as a PNG made from its pixels: Pillow's decoder, in Python, made them (11 s for
    a 4-megapixel picture, minutes within the pixel limit; load_image has FFmpeg's decode it, 0.4 s).
    They come from FFmpeg's decoder now, and a QOI cut short is refused as load_image refuses it."""
    from PIL import QoiImagePlugin

    from internvl_chat.chat.remote_media import image_payload

    def in_python(*args):
        raise AssertionError("Pillow's QOI decoder ran")

    monkeypatch.setattr(QoiImagePlugin.QoiDecoder, "decode", in_python)
    rgba = np.dstack([textured_rgb(48, 20, seed=6), np.full((20, 48), 255, np.uint8)])
    rgba[:5, :7, 3] = 0  # transparent: on white, as to_rgb puts it
    qoi = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(qoi, "QOI")
    payload, mime = image_payload(qoi.getvalue(), "picture.qoi")
    expected = rgba[..., :3].copy()
    expected[:5, :7] = 255
    with Image.open(io.BytesIO(payload)) as sent:
        assert mime == "image/png" and sent.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(sent), expected)
    cut = qoi.getvalue()
    cut = cut[: len(cut) // 2] + bytes(7) + b"\x01"
    with pytest.raises(MediaError) as err:
        image_payload(cut, "picture.qoi")
    assert "picture.qoi" in str(err.value) and "\n" not in str(err.value)


def test_pictures_for_a_server_are_read_as_the_app_reads_them(monkeypatch):
    # an EPS (Pillow runs Ghostscript on it) is refused; garbage EXIF prints no Python warnings
    from PIL import EpsImagePlugin

    from internvl_chat.chat.remote_media import image_payload

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or (_ for _ in ()).throw(OSError("ran")))
    eps = io.BytesIO()
    Image.new("RGB", (16, 16)).save(eps, "EPS")
    with pytest.raises(MediaError) as err:
        image_payload(eps.getvalue(), "photo.jpg")
    assert "photo.jpg" in str(err.value) and ran == []
    exif = io.BytesIO()
    exif_garbage = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 100
    Image.new("RGB", (16, 16), "red").save(exif, "JPEG", exif=exif_garbage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        payload, mime = image_payload(exif.getvalue(), "photo.jpg")
    assert mime in ("image/jpeg", "image/png") and payload
    assert [str(w.message) for w in caught] == []
