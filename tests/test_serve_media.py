"""Media in `serve` requests: data: URLs tiled as the app tiles files, limits, and what a request may read.

Nothing in a request may read local files or make the server fetch a URL unless a flag allows it:
a local HTTP server stands in for "the network" and counts the requests it gets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.server
import os
import re
import threading
import zlib
from pathlib import Path
from urllib.parse import quote

import openai
import pytest
from PIL import Image

from internvl_chat.chat.template import MediaSpec
from media_helpers import (
    cut_at_frame,
    faststart_copy,
    numbered_frame,
    textured_rgb,
    write_growing_video,
    write_inband_growing,
    write_numbered_video,
)
from proxy_helpers import error_page_proxy
from serve_support import data_url, jpeg_frames_url, png_bytes

WAIT_S = 60


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve_media")
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(d / "wide.png")  # 2×1 + thumbnail: 3 tiles
    Image.fromarray(textured_rgb(900, 450, seed=6)).save(d / "wide_other.png")  # same size, other picture
    Image.fromarray(textured_rgb(448, 448, seed=9)).save(d / "square.png")  # 1 tile
    write_numbered_video(d / "clip.mp4", num_frames=30)
    return d


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def ask(client, content, **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], temperature=0, **kw)


def test_image_data_url_costs_the_tiles_the_app_counts(client, builder, media):
    url = data_url(media / "wide.png", "image/png")
    out = ask(client, [{"type": "text", "text": "What is this?"}, image_part(url)])
    assert out.usage.prompt_tokens == len(builder.first_turn("What is this?", [MediaSpec("image", 3)]))
    bare = ask(client, [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": url}])
    assert bare.usage.prompt_tokens == out.usage.prompt_tokens  # the URL as a bare string is accepted too


def test_max_dynamic_patch_per_image_or_per_request(client, builder, media):
    one_tile = len(builder.first_turn("Q", [MediaSpec("image", 1)]))
    url = data_url(media / "wide.png", "image/png")
    assert ask(client, [image_part(url, max_dynamic_patch=1), {"type": "text", "text": "Q"}]).usage.prompt_tokens == one_tile
    out = ask(client, [image_part(url), {"type": "text", "text": "Q"}], extra_body={"mm_processor_kwargs": {"max_dynamic_patch": 1}})
    assert out.usage.prompt_tokens == one_tile


def test_low_detail_is_one_tile_and_a_detail_openai_does_not_have_is_400(client, builder, media):
    # "low" was read and ignored: the client paid for 3 tiles after asking for one low-resolution view
    url = data_url(media / "wide.png", "image/png")
    one_tile, default = (len(builder.first_turn("Q", [MediaSpec("image", n)])) for n in (1, 3))
    assert ask(client, [image_part(url, detail="low"), {"type": "text", "text": "Q"}]).usage.prompt_tokens == one_tile
    for detail in ("high", "auto"):
        assert ask(client, [image_part(url, detail=detail), {"type": "text", "text": "Q"}]).usage.prompt_tokens == default
    # an explicit tile limit wins over the detail
    both = ask(client, [image_part(url, detail="low", max_dynamic_patch=2), {"type": "text", "text": "Q"}])
    assert both.usage.prompt_tokens == default
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [image_part(url, detail="medium"), {"type": "text", "text": "Q"}])
    assert err.value.body["param"] == "messages.0.content.0.image_url.detail"
    assert "'auto', 'low' or 'high'" in err.value.body["message"]


def test_another_picture_of_the_same_size_is_not_taken_from_the_cache(client, builder, media):
    first = [image_part(data_url(media / "wide.png", "image/png")), {"type": "text", "text": "Same words."}]
    other = [image_part(data_url(media / "wide_other.png", "image/png")), {"type": "text", "text": "Same words."}]
    ask(client, first)
    again = ask(client, first)
    # the other slot takes an unrelated conversation, so `first`'s slot is the least recently used and
    # the one `swapped` goes to, whatever earlier tests left in the other (it held their prompts)
    client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Unrelated."}])  # fmt: skip
    swapped = ask(client, other)
    image_start = builder.first_turn("", [MediaSpec("image", 3)]).index(builder.img_start_id)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # all but the last token
    assert swapped.usage.prompt_tokens == again.usage.prompt_tokens  # identical token ids …
    assert swapped.usage.prompt_tokens_details.cached_tokens == image_start  # … but not the same picture


def test_image_features_are_reused_across_conversations_by_content(server, client, media):
    url = data_url(media / "square.png", "image/png")
    content = [image_part(url), {"type": "text", "text": "And this?"}]
    features = server.worker.features
    client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "system", "content": "First system message."}, {"role": "user", "content": content}])  # fmt: skip
    hits, misses = features.hits, features.misses
    other = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "system", "content": "Another one."}, {"role": "user", "content": content}])  # fmt: skip
    assert other.usage.prompt_tokens_details.cached_tokens < 10  # the KV cache could not help …
    assert (features.hits, features.misses) == (hits + 1, misses)  # … but the vision encoder did not run again


def test_video_file_is_sampled_into_frames(client, builder, media):
    url = data_url(media / "clip.mp4", "video/mp4")
    out = ask(client, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}],
              extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})  # fmt: skip
    assert out.usage.prompt_tokens == len(builder.first_turn("What happens?", [MediaSpec("video", 4)]))


def test_presampled_jpeg_frames_are_one_video(client, builder):
    url = jpeg_frames_url([numbered_frame(n) for n in range(3)])
    out = ask(client, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Count."}])
    assert out.usage.prompt_tokens == len(builder.first_turn("Count.", [MediaSpec("video", 3)]))


def test_presampled_frames_percent_encoded_whole_are_the_same_video(client, builder):
    """quote() of the whole frame list (safe=""), as a client that percent-encodes its URLs writes
    it: "%2C" between the frames, which a URL parser reads as commas. It was 400, "not valid base64"."""
    url = jpeg_frames_url([numbered_frame(n) for n in range(3)])
    head, payload = url.split(",", 1)
    encoded = head + "," + quote(payload, safe="")
    assert "%2C" in encoded and "," not in encoded.split(",", 1)[1]
    out = ask(client, [{"type": "video_url", "video_url": {"url": encoded}}, {"type": "text", "text": "Count."}])
    assert out.usage.prompt_tokens == len(builder.first_turn("Count.", [MediaSpec("video", 3)]))


@pytest.mark.parametrize(
    "setting, value, content",
    [
        ("max_images", 1, lambda u: [image_part(u), image_part(u)]),
        ("max_image_pixels", 1000, lambda u: [image_part(u)]),
        ("max_frames", 2, lambda u: [{"type": "video_url", "video_url": {"url": jpeg_frames_url([numbered_frame(0)] * 3)}}]),
        ("max_image_pixels", 1000, lambda u: [{"type": "video_url", "video_url": {"url": jpeg_frames_url([numbered_frame(0)])}}]),
        ("max_image_pixels", 1000, "video file"),
    ],
)
def test_limits_are_400(server, client, media, setting, value, content):
    if content == "video file":  # a video's frames count as images for the pixel limit
        content = lambda u: [{"type": "video_url", "video_url": {"url": data_url(media / "clip.mp4", "video/mp4")}}]  # noqa: E731
    old = getattr(server.options, setting)
    setattr(server.options, setting, value)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, content(data_url(media / "wide.png", "image/png")))
        assert err.value.body["param"].startswith("messages.0.content")
    finally:
        setattr(server.options, setting, old)


def test_bytes_that_are_not_an_image_are_400(client):
    url = "data:image/png;base64," + base64.b64encode(b"certainly not a PNG file").decode()
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [image_part(url)])
    assert err.value.body["param"] == "messages.0.content.0"
    assert "internvl-chat-serve-" not in err.value.body["message"]  # our temporary file's name stays ours


def test_a_url_with_spaces_around_it_is_read_as_url_parsers_read_it(client, media):
    # " data:…" was refused as a local path; an empty URL too ("local paths are never read")
    url = data_url(media / "square.png", "image/png")
    plain = ask(client, [image_part(url)])
    padded = ask(client, [image_part(" \n" + url + "\t")])
    assert (padded.choices[0].message.content, padded.usage.prompt_tokens) == (plain.choices[0].message.content,
                                                                                plain.usage.prompt_tokens)  # fmt: skip
    for empty in ("", "  "):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [image_part(empty)])
        said = err.value.body["message"]
        assert "URL is empty" in said and "data:" in said and "local" not in said, said


def test_a_picture_in_a_system_or_assistant_message_is_told_where_to_send_it(client, media):
    url = data_url(media / "square.png", "image/png")
    for role in ("system", "assistant"):
        messages = [{"role": role, "content": [image_part(url)]}, {"role": "user", "content": "Hi"}]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
        assert err.value.body["param"] == "messages.0.content"
        assert "may only hold text; send its pictures and videos in a user message" in err.value.body["message"]


def test_hostile_media_are_400_that_say_what_to_do_and_the_server_goes_on(client, builder, media, tmp_path):
    eps = tmp_path / "eps.png"
    Image.new("RGB", (16, 16)).save(eps, "EPS")  # Pillow would hand it to Ghostscript
    one_frame = jpeg_frames_url([numbered_frame(0)]).split(",", 1)[1]
    cases = [
        ([image_part(data_url(eps, "image/png"))], "is a PostScript (EPS) drawing, not an image"),
        ([image_part(data_url(media / "clip.mp4", "image/png"))], "is a video, not an image"),
        ([{"type": "video_url", "video_url": {"url": data_url(media / "square.png", "video/mp4")}}], "still picture"),
        ([{"type": "video_url", "video_url": {"url": f"data:video/jpeg;base64,{one_frame},,{one_frame}"}}], "video frame 2 data is empty"),
    ]
    for content, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, content)
        message = err.value.body["message"]
        assert words in message and "\n" not in message and err.value.body["param"] == "messages.0.content.0", message
    # base64 wrapped at 76 columns (MIME, the `base64` tool) is the same picture
    url = data_url(media / "square.png", "image/png")
    head, text = url.split(",", 1)
    wrapped = head + "," + "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    out = ask(client, [image_part(wrapped), {"type": "text", "text": "Q"}])
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("image", 1)]))


def video_part(path: Path, mime: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, mime)}}


def test_a_video_cut_short_is_answered_from_its_frames_and_one_damaged_before_a_sampled_frame_is_400(
    client, builder, media, tmp_path
):  # fmt: skip
    whole = faststart_copy(media / "clip.mp4", tmp_path / "whole.mp4")
    frames = {"media_io_kwargs": {"video": {"num_frames": 4}}}
    out = ask(client, [video_part(cut_at_frame(whole, tmp_path / "cut.mp4", 9)), {"type": "text", "text": "Q"}],
              extra_body=frames)  # fmt: skip
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("video", 4)]))
    data = whole.read_bytes()
    start = data.index(b"mdat") + 400
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(data[:start] + bytes(range(256)) * ((len(data) - start) // 256 + 1))
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [video_part(damaged), {"type": "text", "text": "Q"}], extra_body=frames)
    message = err.value.body["message"]
    assert message.startswith("cannot decode the media past frame ") and "the file is damaged there" in message, message
    assert "\n" not in message and "internvl-chat-serve-" not in message


def test_a_new_video_s_header_is_read_once_when_its_request_is_measured(server, tmp_path, monkeypatch):
    # probe_video, the frame-size check and decode_cost each opened the file and read its header
    from internvl_chat.media import video, video_header, video_sources
    from internvl_chat.serve.errors import APIError

    clip = write_numbered_video(tmp_path / "once.mp4", num_frames=12)  # its URL is in no cache
    headers, opens = [], []
    real_header, real_open = video.read_header, video_header.open_container
    monkeypatch.setattr(video, "read_header", lambda *a, **kw: headers.append(1) or real_header(*a, **kw))
    for opener in (video_header, video_sources):  # the header's read and PyAV's frame source each open the file
        monkeypatch.setattr(opener, "open_container", lambda *a, **kw: opens.append(1) or real_open(*a, **kw))
    item = server.worker.reader.video(data_url(clip, "video/mp4"), "messages.0.content.0", 4)
    assert item.tiles == 4 and headers == [1]
    assert len(opens) <= 2  # the header's, and PyAV's key-frame scan where it plans (decord opens the file itself)
    # a frame over the pixel limit is refused from that header, before any key frame is read
    headers.clear(), opens.clear()
    monkeypatch.setattr(server.options, "max_image_pixels", 1000)
    monkeypatch.setattr(video, "DecordSource", lambda *a, **kw: pytest.fail("decord opened the video"))
    with pytest.raises(APIError) as err:  # 13 frames: another file, not the cached URL
        server.worker.reader.video(data_url(write_numbered_video(tmp_path / "big.mp4", num_frames=13), "video/mp4"),
                                   "messages.0.content.0", 4)  # fmt: skip
    assert err.value.status == 400 and "a video frame has 3,072 pixels, over this server's limit of 1,000" in str(err.value)
    assert headers == [1] and opens == [1]


def test_a_video_s_parameter_sets_are_walked_once_from_its_plan_to_its_frames(server, tmp_path, monkeypatch):
    """serve plans each video as its request is read and decodes it later: the size decord's frames
    are counted at (a walk of every sample's NAL units: video_sps) was found for each; the plan's serves both."""
    pytest.importorskip("decord")
    from internvl_chat.media import video_sources
    from internvl_chat.media.video import BACKEND_ENV, decode_cost
    from internvl_chat.serve.media import DecodeAllowance

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    clip = write_inband_growing(tmp_path / "grows.mp4", small=10, large=20)  # 64×48 says the header, then 512×512
    cost = decode_cost(clip, 4)
    assert (cost.backend, cost.width, cost.height) == ("decord", 512, 512)
    walks, real_walk = [], video_sources.decoded_size
    monkeypatch.setattr(video_sources, "decoded_size", lambda *a, **kw: walks.append(1) or real_walk(*a, **kw))
    item = server.worker.reader.video(data_url(clip, "video/mp4"), "messages.0.content.0", 4)
    allowance = DecodeAllowance(None)
    assert server.worker.reader.pixels(item, allowance=allowance).shape[0] == 4
    assert walks == [1] and allowance.used == cost.pixels  # each frame counted at the size planned


def test_a_video_whose_decoding_is_over_the_limit_is_400_before_any_frame_is_decoded(server, client, builder, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    from internvl_chat.serve import media as serve_media

    clip = write_numbered_video(tmp_path / "clip.mp4", num_frames=31)  # its features are in no cache
    decodes = []
    real_load_video = serve_media.load_video
    monkeypatch.setattr(serve_media, "load_video", lambda *a, **kw: decodes.append(1) or real_load_video(*a, **kw))
    # 31 frames of 64×48; 4 sampled need at least 4 decoded (12,288 pixels)
    monkeypatch.setattr(server.options, "max_video_decode_pixels", 12_000)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [video_part(clip)], extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    message = err.value.body["message"]
    assert re.fullmatch(r"the video needs \d+ frames of 64×48 \([\d.]+ megapixels, each frame counted as 128×128\) decoded "
                        r"to reach the frames sampled, over this server's limit of 0\.012 megapixels for a request's videos; send a "
                        r"shorter or smaller clip"
                        r"(, fewer frames \(num_frames\))?, or frames sampled already \(data:video/jpeg;base64,F1,F2,…\)",
                        message), message  # fmt: skip
    assert err.value.body["param"] == "messages.0.content.0" and decodes == []
    monkeypatch.setattr(server.options, "max_video_decode_pixels", None)  # no limit: the same request is answered
    out = ask(client, [video_part(clip), {"type": "text", "text": "Q"}],
              extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})  # fmt: skip
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("video", 4)])) and decodes == [1]


def test_a_video_whose_frames_outgrow_its_header_is_stopped_at_the_limit_and_the_server_goes_on(server, client, builder,
                                                                                               tmp_path, monkeypatch):  # fmt: skip
    path = write_growing_video(tmp_path / "growing.ts", small=10, large=20)  # 64×48 says the header, then 512×512
    monkeypatch.setattr(server.options, "max_video_decode_pixels", 1_000_000)  # the plan (under 100,000) fits
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [video_part(path, "video/mp2t")], extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    message = err.value.body["message"]
    assert message.startswith("decoding the video passed the limit of 1 megapixels after ") and message.endswith(
        "frames (its frames are larger than its header says); cut the clip shorter or scale it down, or send frames "
        "sampled already (data:video/jpeg;base64,F1,F2,…)"), message  # fmt: skip
    assert err.value.body["param"] == "messages.0.content.0"
    out = ask(client, [{"type": "text", "text": "Q"}])
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", []))


def test_the_limit_is_for_all_the_video_files_a_request_decodes(server, client, builder, tmp_path, monkeypatch):
    """Each file fits the limit alone, not both together: the engine decodes the first and stops
    before the second. A file whose features are cached costs nothing."""
    from internvl_chat.media.video import decode_cost

    first, second = (write_numbered_video(tmp_path / f"clip{n}.mp4", num_frames=n) for n in (33, 34))
    costs = [decode_cost(path, 4).pixels for path in (first, second)]
    monkeypatch.setattr(server.options, "max_video_decode_pixels", sum(costs) - 1)
    both = [video_part(first), video_part(second), {"type": "text", "text": "Q"}]
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, both, extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    message = err.value.body["message"]
    assert message == (f"the videos of this request need more decoding than this server's limit of {(sum(costs) - 1) / 1e6:.6g} "
                       f"megapixels for a request's videos: {costs[0] / 1e6:.6g} used by those before this one, and this one "
                       f"needs {decode_cost(second, 4)}; send fewer, shorter or smaller clips, or send frames sampled already "
                       "(data:video/jpeg;base64,F1,F2,…)"), message  # fmt: skip
    assert err.value.body["param"] == "messages.0.content.1"
    # the first one's features are cached now: asked again, only the second one is decoded, and fits
    out = ask(client, both, extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("video", 4)] * 2))


# ---- what a request may read --------------------------------------------------------------------


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    encoding = ""  # its Content-Encoding, if any
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        type(self).hits.append(self.path)
        self.send_response(200)
        if self.encoding:
            self.send_header("Content-Encoding", self.encoding)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web(media):
    _CountingHandler.body = (media / "wide.png").read_bytes()
    _CountingHandler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _CountingHandler.hits
    httpd.shutdown()
    httpd.server_close()


@contextlib.contextmanager
def _remote_media_allowed(server):
    """The module's server fetches http(s) image URLs inside the block (--allow-remote-media), not after it."""
    server.options.allow_remote_media = True
    try:
        yield
    finally:
        server.options.allow_remote_media = False


def test_remote_urls_are_never_fetched_without_the_flag(server, client, builder, web):
    base, hits = web
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [image_part(f"{base}/wide.png")])
    assert "--allow-remote-media" in err.value.body["message"]
    assert hits == []  # the server did not even try
    with _remote_media_allowed(server):
        out = ask(client, [image_part(f"{base}/wide.png"), {"type": "text", "text": "Q"}])
    assert hits == ["/wide.png"]
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("image", 3)]))


def test_local_files_only_inside_the_allowed_folder(server, client, media, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "inside.png").write_bytes(png_bytes(textured_rgb(64, 64, seed=1)))
    (tmp_path / "secret.png").write_bytes(png_bytes(textured_rgb(64, 64, seed=2)))
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    inside = [image_part(f"file://{allowed}/inside.png")]

    with pytest.raises(openai.BadRequestError) as err:
        ask(client, inside)  # no folder allowed: nothing local is read
    assert "--allow-local-media" in err.value.body["message"]

    server.options.allow_local_media = allowed.resolve()
    try:
        assert ask(client, inside).usage.prompt_tokens > 256
        for escape in (f"file://{allowed}/link.png", f"file://{allowed}/../secret.png", f"file://{tmp_path}/secret.png"):
            with pytest.raises(openai.PermissionDeniedError):
                ask(client, [image_part(escape)])
        with pytest.raises(openai.BadRequestError):
            ask(client, [image_part(f"file://{allowed}")])  # inside, but a folder
    finally:
        server.options.allow_local_media = None


def test_media_urls_that_cannot_be_parsed_are_400(server, client, tmp_path):
    # each fails while the URL is parsed (no connection is made): the client's mistake, not a server error
    bad = ["http://example.invalid:port/x.png", "https://256.256.256.256/x.png", "https://example.invalid/\x00.png",
           "http://" + "a" * 300 + ".invalid/x.png", f"file://{tmp_path}/%00.png", "file://[::1/x.png"]  # fmt: skip
    server.options.allow_remote_media, server.options.allow_local_media = True, tmp_path.resolve()
    try:
        for url in bad:
            with pytest.raises(openai.BadRequestError) as err:
                ask(client, [image_part(url)])
            assert err.value.body["param"] == "messages.0.content.0" and "URL" in err.value.body["message"], url
    finally:
        server.options.allow_remote_media, server.options.allow_local_media = False, None
    assert ask(client, "Hi").choices[0].finish_reason in ("stop", "length")


def test_a_resent_picture_is_remembered_by_a_digest_not_by_its_url_text(server, client, media):
    # the cache held each data: URL's text (up to 256 MiB in all, in no setting); a resend must still
    # skip decoding and probing
    reader = server.worker.reader
    url = data_url(media / "square.png", "image/png")
    content = [image_part(url), {"type": "text", "text": "Remembered?"}]
    ask(client, content)
    fetched = []
    real_fetch = reader.fetch
    reader.fetch = lambda *a: fetched.append(a) or real_fetch(*a)
    try:
        ask(client, content)
    finally:
        del reader.fetch
    assert fetched == []  # not decoded again
    held = [part for key in reader._by_url for part in key if isinstance(part, (str, bytes))]
    assert held and max(len(part) for part in held) <= 64


@pytest.fixture
def naysaying_proxy():
    """A proxy that answers every request with an HTML page: 403 to a CONNECT (a tunnel refused),
    407 to a plain-HTTP proxy's GET (credentials wanted)."""
    with error_page_proxy(lambda head: 403 if head.startswith(b"CONNECT ") else 407, WAIT_S) as port:
        yield port


@pytest.mark.parametrize("case", ["socks without socksio", "unusable URL", "down", "tunnel refused", "credentials wanted"])
def test_a_proxy_the_server_cannot_fetch_through_is_a_502_that_blames_it_not_the_url(server, client, monkeypatch, case,
                                                                                     naysaying_proxy):
    """With --allow-remote-media and proxy variables in the server's environment, a SOCKS proxy
    without socksio was an ImportError (500), a proxy URL httpx refuses a 400 saying the client's
    URL was not valid (with the proxy's user name), and a proxy down, refusing the tunnel or asking
    for credentials a 400 that blamed the client's URL."""
    import socket

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the test's own client goes directly
    monkeypatch.setitem(__import__("sys").modules, "socksio", None)  # not installed (an import of it fails)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
    variable, value = {
        "socks without socksio": ("ALL_PROXY", "socks5://me:s3cret@127.0.0.1:1080"),
        "unusable URL": ("https_proxy", "ftp://me:s3cret@127.0.0.1:21"),
        "down": ("HTTPS_PROXY", f"http://me:s3cret@127.0.0.1:{closed.getsockname()[1]}"),
        "tunnel refused": ("HTTPS_PROXY", f"http://me:s3cret@127.0.0.1:{naysaying_proxy}"),
        "credentials wanted": ("HTTP_PROXY", f"http://me:s3cret@127.0.0.1:{naysaying_proxy}"),
    }[case]
    monkeypatch.setenv(variable, value)
    try:
        with _remote_media_allowed(server):
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, [image_part(("http" if variable == "HTTP_PROXY" else "https") + "://media.invalid/x.png")])
    finally:
        closed.close()
    body = err.value.body
    assert err.value.status_code == 502 and body["code"] == "proxy_error" and body["param"] == "messages.0.content.0"
    message = body["message"]
    assert variable in message and "s3cret" not in message and "me:" not in message and "\n" not in message
    assert "not a valid" not in message and message.endswith("send the image inline as a data: URL")
    monkeypatch.delenv(variable)
    assert ask(client, "Hi").choices[0].finish_reason in ("stop", "length")  # the server goes on


@contextlib.contextmanager
def _redirecting_to(location: str):
    """A local web server that answers every GET with a 302 to `location`; yields a URL on it."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/x.png"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_redirect_to_a_host_behind_a_proxy_that_is_down_blames_the_proxy(server, client, monkeypatch):
    """The proxy is the one of the request that failed: a redirect from a NO_PROXY host to one
    reached through the proxy was a 400 that blamed the client's URL."""
    import socket

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    with _redirecting_to("https://media.invalid/x.png") as url, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with _remote_media_allowed(server):
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, [image_part(url)])
    assert err.value.status_code == 502 and "the proxy in HTTPS_PROXY" in err.value.body["message"]


@pytest.fixture
def tarpit():
    """A web server that never finishes an answer: its head (where="head") or its body a byte
    every 50 ms, each within any read timeout, until the test ends."""
    import socket

    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(where: str) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n"
            if where == "body":
                conn.sendall(head + b"\r\n")
            for byte in iter(lambda: b"X-Slow: y\r\n" if where == "head" else b"\x00", None):
                if done.wait(0.05):
                    return
                try:
                    conn.sendall(byte)
                except OSError:  # the server gave up on it
                    return

    def start(where: str) -> str:
        threading.Thread(target=serve, args=(where,), daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png"

    yield start
    done.set()
    listener.close()


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_remote_picture_that_trickles_in_is_refused_at_the_fetch_deadline(server, client, monkeypatch, tarpit, where):
    """The fetch had a timeout for each read only: a host sending a byte now and then held the
    request, and a worker thread of the server's, for ever (the client's leaving did not end it);
    a few dozen such requests left no thread to prepare any other request."""
    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 1.0)
    url = tarpit(where)
    with _remote_media_allowed(server):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client.with_options(timeout=WAIT_S), [image_part(url)])
    message = err.value.body["message"]
    assert message.startswith(f"the image at {url} did not arrive within 1 s"), message
    assert ask(client, "Hi").choices[0].finish_reason in ("stop", "length")  # the server goes on


@pytest.fixture
def slow_pictures(media):
    """A web server that sends a whole picture to every request, in `pieces` pieces 0.1 s apart:
    each fetch finishes, and takes at least (pieces - 1) × 0.1 s."""
    import socket

    body = (media / "square.png").read_bytes()
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)

    def serve(conn, pieces: int) -> None:
        with conn:
            conn.recv(65536)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            step = -(-len(body) // pieces)
            try:
                conn.sendall(head + body[:step])
                for at in range(step, len(body), step):
                    if done.wait(0.1):
                        return
                    conn.sendall(body[at : at + step])
            except OSError:  # the server gave up on it
                return

    def accept(pieces: int) -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # the 0.1 s timeout (to see `done`), or the listener closed
                continue
            threading.Thread(target=serve, args=(conn, pieces), daemon=True).start()

    def start(pieces: int) -> str:
        threading.Thread(target=accept, args=(pieces,), daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    done.set()
    listener.close()


def test_the_remote_pictures_of_a_request_share_one_deadline(server, client, monkeypatch, slow_pictures):
    """Each fetch had its own deadline: a request names up to max_images URLs (32), and hosts
    that each sent their picture just within it held a worker thread for 32 × 20 s."""
    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 60.0)  # no fetch alone reaches it
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 1.0)  # less than the three pictures take
    base = slow_pictures(10)
    parts = [image_part(f"{base}/{n}.png") for n in range(3)]
    with _remote_media_allowed(server):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client.with_options(timeout=WAIT_S), [*parts, {"type": "text", "text": "Q"}])
    message = err.value.body["message"]
    assert "this server gives the http(s) media of a request 1 s in all; send fewer" in message, message
    assert err.value.body["param"] in [f"messages.0.content.{n}" for n in range(3)]
    assert ask(client, "Hi").choices[0].finish_reason in ("stop", "length")  # the server goes on


def test_a_remote_picture_past_the_requests_fetch_time_is_not_fetched(server, client, monkeypatch, web):
    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 0.0)  # spent before the first fetch
    base, hits = web
    with _remote_media_allowed(server):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [image_part(f"{base}/wide.png")])
    assert err.value.body["message"] == (f"the image at {base}/wide.png was not fetched: this server gives the http(s) "
                                         "media of a request 0 s in all; send fewer of them (the whole history counts), "
                                         "or send the image inline as a data: URL")  # fmt: skip
    assert hits == []


def _animated_png(tmp_path):
    """A 40-frame animated PNG: its frame count is found by demuxing the whole file."""
    path = tmp_path / "moving.png"
    frames = [Image.fromarray(numbered_frame(n)) for n in range(40)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    return path


def _raw_video_request(path) -> bytes:
    """An HTTP request asking about the video at `path` (inline), to send on a raw socket."""
    body = ('{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [{"type": "video_url", '
            f'"video_url": {{"url": "{data_url(path, "video/apng")}"}}}}]}}]}}').encode()  # fmt: skip
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _CountWatch:
    """Counts the packets a video's frame count demuxes, and holds the count at its fifth packet
    until the request's watcher (serve.app._set_when_gone, which starts when preparing does) has
    set the cancel: `loop` and `gone` are the watcher's."""

    def __init__(self, monkeypatch, why: str):
        from internvl_chat.media import video_header
        from internvl_chat.serve import app as serve_app

        self.started, self.counting, self.demuxed = threading.Event(), threading.Event(), []
        self.loop, self.gone = None, None
        watch, add = serve_app._set_when_gone, video_header.PacketSpan.add

        async def watching(request, gone):
            self.loop, self.gone = asyncio.get_running_loop(), gone
            self.started.set()
            await watch(request, gone)

        def counted(span, packet) -> None:
            add(span, packet)
            self.demuxed.append(packet)
            if len(self.demuxed) == 5:
                self.counting.set()
                # the watcher may start after the count reached its fifth packet
                assert self.started.wait(WAIT_S) and self.gone.wait(WAIT_S), why

        monkeypatch.setattr(serve_app, "_set_when_gone", watching)
        monkeypatch.setattr(video_header.PacketSpan, "add", counted)


def test_a_client_that_leaves_while_its_video_s_frames_are_counted_stops_the_count(server, tmp_path, monkeypatch):
    """An animated PNG stores no frame count: measuring it demuxes the whole file, on the request's
    thread, and a client that left waited for that to the end (as did the server's threads). Here
    it leaves as the fifth packet is counted; the count goes no further."""
    import socket

    from internvl_chat.media import video_header

    path = _animated_png(tmp_path)
    count = _CountWatch(monkeypatch, "the server did not see its client leave")
    ended, demux = threading.Event(), video_header.demux_length

    def demux_length(*args, **kw):
        try:
            return demux(*args, **kw)
        finally:
            ended.set()

    monkeypatch.setattr(video_header, "demux_length", demux_length)
    request = _raw_video_request(path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        assert count.counting.wait(WAIT_S)
    assert ended.wait(WAIT_S) and len(count.demuxed) == 5


def _answer_while_ending(server, sock, loop) -> bytes:
    """All that `sock` receives while the server is stopping (app.state.ending set on `loop`, the
    server's event loop); cleared after, as the module's server serves on."""

    async def set_ending(on: bool) -> None:
        server.app.state.ending.set() if on else server.app.state.ending.clear()

    asyncio.run_coroutine_threadsafe(set_ending(True), loop).result(WAIT_S)
    answer = b""
    try:
        while block := sock.recv(4096):
            answer += block
    finally:
        asyncio.run_coroutine_threadsafe(set_ending(False), loop).result(WAIT_S)
    return answer


def test_the_end_of_the_shutdown_s_grace_period_stops_a_video_s_count_with_a_503(server, tmp_path, monkeypatch):
    """The grace period over, bodies still coming get a 503 and queued jobs end; a request whose
    animated PNG was being counted (demuxing the whole file) went on counting, its client and the
    server's exit waiting for it. Here the grace period ends as the fifth packet is counted."""
    import json
    import socket

    path = _animated_png(tmp_path)
    count = _CountWatch(monkeypatch, "the count was not told the server is stopping")

    request = _raw_video_request(path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        assert count.counting.wait(WAIT_S) and count.started.wait(WAIT_S)
        answer = _answer_while_ending(server, sock, count.loop)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(rest)["error"]["code"] == "shutting_down", answer
    assert len(count.demuxed) == 5


@pytest.fixture
def endless_head():
    """A web server whose answer's head never ends (a header line every 50 ms); `ended` is set once
    the fetching side has closed or shut the connection."""
    import socket

    accepted, ended, done = threading.Event(), threading.Event(), threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.set()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not done.wait(0.05):
                    conn.sendall(b"X-Slow: y\r\n")
            except OSError:  # the fetch gave up on it
                ended.set()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png", accepted, ended
    done.set()
    listener.close()


def _raw_image_request(url: str) -> bytes:
    body = ('{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [{"type": "image_url", '
            f'"image_url": {{"url": "{url}"}}}}]}}]}}').encode()  # fmt: skip
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_a_client_that_leaves_while_its_picture_is_fetched_stops_the_fetch(server, monkeypatch, endless_head):
    """The fetch ran on to its own deadline (20 s) after its client had gone, holding a thread that
    prepares requests and the remote host's connection for nothing."""
    import socket

    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 3600.0)  # only the client's leaving can end it here
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 3600.0)
    url, accepted, ended = endless_head
    with _remote_media_allowed(server):
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(_raw_image_request(url))
            assert accepted.wait(WAIT_S)
        assert ended.wait(WAIT_S), "the fetch went on after its client left"


def test_the_end_of_the_shutdown_s_grace_period_stops_a_fetch_with_a_503(server, monkeypatch, endless_head):
    """The grace period over, a request whose picture was being fetched went on fetching up to 20 s
    (60 s for all of a request's), the server's exit waiting for it."""
    import json
    import socket

    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 3600.0)
    from internvl_chat.serve import app as serve_app

    url, accepted, ended = endless_head
    loops, watch = [], serve_app._set_when_gone

    async def watching(request, gone):  # the server's event loop, where `ending` is set
        loops.append(asyncio.get_running_loop())
        await watch(request, gone)

    monkeypatch.setattr(serve_app, "_set_when_gone", watching)

    with _remote_media_allowed(server):
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(_raw_image_request(url))
            assert accepted.wait(WAIT_S) and loops
            answer = _answer_while_ending(server, sock, loops[0])
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(rest)["error"]["code"] == "shutting_down", answer
    assert ended.wait(WAIT_S)


def _gzipped_zeros(size: int) -> bytes:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join([*(squeeze.compress(block) for _ in range(size >> 20)), squeeze.flush()])


def test_a_compressed_remote_body_is_decoded_within_the_limit(server, client, media, web):
    """httpx decoded each block received whole: a body gzipped twice ("Content-Encoding: gzip,
    gzip"), a few hundred bytes, became hundreds of megabytes in the server's memory at once, before
    the size limit was looked at. A picture gzipped still arrives; a coding not decoded is a 400."""
    import tracemalloc

    base, hits = web
    bomb = gzip.compress(_gzipped_zeros(256 << 20))  # 256 MiB of zeros in well under a kilobyte
    picture = _CountingHandler.body
    server.options.allow_remote_media = True
    limit, server.options.max_body_bytes = server.options.max_body_bytes, 1 << 20
    try:
        _CountingHandler.body, _CountingHandler.encoding = bomb, "gzip, gzip"
        tracemalloc.start()
        try:
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, [image_part(f"{base}/bomb.png")])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err.value.status_code == 413 and "over the 1 MiB limit" in err.value.body["message"]
        assert peak < 64 << 20, f"{peak >> 20} MiB held at once"
        server.options.max_body_bytes = limit
        _CountingHandler.body, _CountingHandler.encoding = gzip.compress(picture), "gzip"
        assert ask(client, [image_part(f"{base}/wide.png")]).usage.prompt_tokens > 256
        _CountingHandler.encoding = "br"
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [image_part(f"{base}/wide.png")])
        assert "came compressed as br, which this server does not decode" in err.value.body["message"]
    finally:
        server.options.allow_remote_media, server.options.max_body_bytes = False, limit
        _CountingHandler.body, _CountingHandler.encoding = picture, ""


def test_a_redirect_to_a_url_that_is_not_http_blames_the_redirect_not_the_client_s_url(server, client):
    """A host's redirect to a data: URL was "the image URL is not a valid http(s) URL; check it":
    the client's URL, fetched, was fine."""

    with _redirecting_to("data:image/png;base64,AAAA") as url:
        with _remote_media_allowed(server):
            with pytest.raises(openai.BadRequestError) as err:
                ask(client, [image_part(url)])
    message = err.value.body["message"]
    assert message.startswith(f"cannot fetch the image at {url}: {url} redirects to a URL that is not a valid"), message


def test_an_https_url_redirecting_to_plain_http_is_refused_naming_the_redirect(server, monkeypatch):
    """An https URL whose host redirected to http:// was followed: the media came unencrypted, open
    to anyone on the path, though the client asked for https. The downgrade is refused, the http
    URL never fetched (httpx's own transport, answering from a handler: no certificate needed)."""
    import httpx

    from internvl_chat import proxy_env
    from internvl_chat.serve.errors import APIError

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    fetched = []

    def answer(request):
        fetched.append(str(request.url))
        if request.url.scheme == "https" and request.url.path == "/x.png":
            return httpx.Response(302, headers={"Location": "http://media.test/x.png"})
        return httpx.Response(302, headers={"Location": "https://media.test/x.png"})  # http to https: followed

    real = proxy_env.client
    monkeypatch.setattr(proxy_env, "client", lambda **kwargs: real(**kwargs, transport=httpx.MockTransport(answer)))
    with _remote_media_allowed(server):
        for url in ("https://media.test/x.png", "http://media.test/start.png"):
            fetched.clear()
            with pytest.raises(APIError) as err:
                server.worker.prompts.reader.fetch(url, "messages.0.content.0", "image")
            assert fetched[-1] == "https://media.test/x.png", fetched  # the http URL never fetched
            assert err.value.status == 400 and str(err.value).startswith(
                f"cannot fetch the image at {url}: https://media.test/x.png redirects to http://media.test/x.png, "
                "from https to plain http"), str(err.value)  # fmt: skip


def test_a_remote_body_declared_over_the_limit_is_refused_before_it_is_read(server, client, monkeypatch):
    """A Content-Length over the limit was read up to the limit first: a host that declared a
    huge body and sent it slowly (here not at all) held the request to the fetch's deadline."""
    import socket

    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 3600.0)
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    limit = server.options.max_body_bytes

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {limit + 1}\r\n\r\n".encode())
            done.wait(WAIT_S)  # the body never comes

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/huge.png"
    try:
        with _remote_media_allowed(server):
            with pytest.raises(openai.APIStatusError) as err:
                ask(client.with_options(timeout=WAIT_S / 2, max_retries=0), [image_part(url)])
    finally:
        done.set()
        listener.close()
    assert err.value.status_code == 413 and err.value.body["message"] == f"the image at {url} is over the {limit >> 20} MiB limit"


@pytest.fixture
def stuck_resolver(monkeypatch):
    """Name look-ups of slow.invalid never answer (until the test ends); `asked` is set at the first."""
    import socket

    asked, release = threading.Event(), threading.Event()
    lookup = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        if host in ("slow.invalid", b"slow.invalid"):
            asked.set()
            release.wait(WAIT_S)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return lookup(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked
    release.set()


def test_a_name_look_up_that_never_answers_ends_at_the_fetch_deadline(server, client, monkeypatch, stuck_resolver):
    """The deadline shut the fetch's sockets, but a look-up of the host's name has none: a resolver
    that did not answer held the request, its thread, and the server's exit past every deadline."""
    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 1.0)
    with _remote_media_allowed(server):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client.with_options(timeout=WAIT_S / 2, max_retries=0), [image_part("http://slow.invalid/x.png")])
    assert stuck_resolver.is_set()
    message = err.value.body["message"]
    assert message.startswith("the image at http://slow.invalid/x.png did not arrive within 1 s"), message


def test_a_client_that_leaves_while_a_name_is_looked_up_is_answered_no_more(server, monkeypatch, stuck_resolver):
    """As with a host that trickles its answer, the client's leaving must end the fetch."""
    import socket

    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 3600.0)
    prepared, made = threading.Event(), server.worker.prompts.make

    def make(*args, **kw):
        try:
            return made(*args, **kw)
        finally:
            prepared.set()

    monkeypatch.setattr(server.worker.prompts, "make", make)
    with _remote_media_allowed(server):
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(_raw_image_request("http://slow.invalid/x.png"))
            assert stuck_resolver.wait(WAIT_S)
        assert prepared.wait(WAIT_S / 2), "the request's preparing went on after its client left"


def _decoded_body(blocks, encoding: str) -> bytes:
    from internvl_chat.serve.media import _decoded

    return b"".join(_decoded(iter(blocks), encoding, "image", "http://host/x.png", "messages.0.content.0"))


def test_a_deflated_body_whose_first_byte_comes_alone_is_still_read_as_zlib_s_format():
    """Which deflate format a body is in was told from its first block's two bytes: a host whose
    first block (a chunk of one byte) held one took zlib's format for bare deflate data, a 400."""
    data = bytes(range(256)) * 64
    wrapped = zlib.compress(data)
    assert _decoded_body([wrapped[:1], wrapped[1:]], "deflate") == data
    assert _decoded_body([bytes([b]) for b in wrapped], "deflate") == data
    bare = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = bare.compress(data) + bare.flush()
    assert _decoded_body([raw[:1], b"", raw[1:]], "deflate") == data


def test_a_compressed_remote_body_cut_short_is_a_400_that_says_so(server, client, web):
    """A compressed body that ended before its compressed data did (a host that closed the
    connection early, no Content-Length to tell) was taken as whole: the picture's first part, or
    a body without its checksum, went on to the image decoder as if it had arrived."""
    from internvl_chat.serve.errors import APIError

    data = bytes(range(256)) * 64
    for coding, packed in ("gzip", gzip.compress(data)), ("deflate", zlib.compress(data)):
        for cut in packed[:1], packed[: len(packed) // 2], packed[:-4]:
            with pytest.raises(APIError) as err:
                _decoded_body([cut], coding)
            assert err.value.status == 400 and "was cut short" in err.value.message, (coding, len(cut))
    base, _ = web
    picture = _CountingHandler.body
    server.options.allow_remote_media = True
    try:
        _CountingHandler.body, _CountingHandler.encoding = gzip.compress(picture)[:-8], "gzip"  # no trailer
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [image_part(f"{base}/wide.png")])
    finally:
        server.options.allow_remote_media = False
        _CountingHandler.body, _CountingHandler.encoding = picture, ""
    assert err.value.body["message"].startswith(f"the image at {base}/wide.png came compressed (gzip) but was cut short")


def test_a_gzip_body_of_several_members_is_decoded_whole(server, client, builder, web):
    """A gzip body may be members one after another (RFC 1952; `cat a.gz b.gz`): the first alone
    was decoded and the rest dropped, a picture cut at its first member's end. Bytes after the end
    that begin no member are still ignored."""
    data = bytes(range(256)) * 64
    members = gzip.compress(data[:5000]) + gzip.compress(b"") + gzip.compress(data[5000:])
    assert _decoded_body([members], "gzip") == data
    assert _decoded_body([members[:7], members[7:]] + [b"\0" * 9], "gzip") == data  # zeros after it: ignored
    base, _ = web
    picture = _CountingHandler.body
    half = len(picture) // 2
    server.options.allow_remote_media = True
    try:
        _CountingHandler.body = gzip.compress(picture[:half]) + gzip.compress(picture[half:])
        _CountingHandler.encoding = "gzip"
        out = ask(client, [image_part(f"{base}/wide.png"), {"type": "text", "text": "Q"}])
    finally:
        server.options.allow_remote_media = False
        _CountingHandler.body, _CountingHandler.encoding = picture, ""
    assert out.usage.prompt_tokens == len(builder.first_turn("Q", [MediaSpec("image", 3)]))


def test_the_limit_is_for_a_compressed_remote_body_s_decoded_bytes(server, client, web):
    """The limit was applied to the bytes as they came too (and to their Content-Length): a picture
    within it that a host gzipped (a PNG does not compress: gzip makes it longer) was a 413."""
    import io

    import numpy as np

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(out, "PNG")
    picture = out.getvalue()
    packed = gzip.compress(picture)
    assert len(packed) > len(picture)
    base, _ = web
    original, limit = _CountingHandler.body, server.options.max_body_bytes
    server.options.allow_remote_media = True
    try:
        _CountingHandler.body, _CountingHandler.encoding = packed, "gzip"
        server.options.max_body_bytes = len(picture)
        assert ask(client, [image_part(f"{base}/noise.png")]).usage.prompt_tokens > 256
        server.options.max_body_bytes = len(picture) - 1  # the decoded bytes, exactly
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, [image_part(f"{base}/noise.png")])
        assert err.value.status_code == 413
    finally:
        server.options.allow_remote_media, server.options.max_body_bytes = False, limit
        _CountingHandler.body, _CountingHandler.encoding = original, ""


def test_a_remote_body_coded_over_and_over_is_a_400_not_a_500(server, client, web):
    """Each coding of a Content-Encoding was a generator reading the next one's: a host that listed
    "gzip" a thousand times (a few kilobytes of header) overflowed the stack, a 500 with a traceback."""
    data = bytes(range(256)) * 64
    packed = data
    for _ in range(5):
        packed = gzip.compress(packed)
    assert _decoded_body([packed], ", ".join(["gzip"] * 5)) == data  # as many as anyone uses, and more
    base, _ = web
    picture = _CountingHandler.body
    server.options.allow_remote_media = True
    try:
        _CountingHandler.body, _CountingHandler.encoding = gzip.compress(picture), ", ".join(["gzip"] * 1200)
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, [image_part(f"{base}/wide.png")])
    finally:
        server.options.allow_remote_media = False
        _CountingHandler.body, _CountingHandler.encoding = picture, ""
    assert err.value.status_code == 400, err.value.body
    assert "came compressed 1200 times over, more than the 5 this server decodes" in err.value.body["message"]


def test_a_fetch_cancelled_in_its_tls_handshake_lets_go_of_its_connection(server, monkeypatch):
    """The cancel shut the sockets the fetch had connected, but the TLS handshake wraps the one it
    connects (the object registered then shuts nothing): a host that never answered the handshake
    kept the fetch's thread and connection to the fetch's deadline after its request had gone."""
    import socket

    from internvl_chat.errors import Cancelled
    from internvl_chat.serve import media

    monkeypatch.setattr(media, "REMOTE_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(media, "REQUEST_REMOTE_TIMEOUT_S", 3600.0)
    cancel, ended = threading.Event(), threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT_S / 4)
            conn.recv(65536)  # its ClientHello, never answered
            cancel.set()
            try:
                while conn.recv(65536):
                    pass
                ended.set()  # the fetch let go of the connection
            except OSError:  # (timed out: it held on)
                pass

    threading.Thread(target=serve, daemon=True).start()
    server.options.allow_remote_media = True
    try:
        with pytest.raises(Cancelled):
            server.worker.prompts.reader.fetch(f"https://127.0.0.1:{listener.getsockname()[1]}/x.png", "p", "image",
                                               media.RemoteBudget(cancel))  # fmt: skip
        assert ended.wait(WAIT_S / 2), "the fetch held its connection after its request was cancelled"
    finally:
        server.options.allow_remote_media = False
        listener.close()
