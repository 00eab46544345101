"""`cache_salt` and `--no-shared-cache` (serve/namespaces.py): what one client's request finds in the
server's caches never tells it what another client sent, with no timing needed.

Without them, `cached_tokens` confirmed a guess of another client's conversation in one request
(the right PIN kept more of the prompt than a wrong one), and a video someone had sent cost nothing
against the decoding limit (a 400 or not said whether it had been sent). Every check here is a
count or a status, never a time.
"""

from __future__ import annotations

import base64

import httpx
import pytest

from internvl_chat.serve.features import FeatureCache
from internvl_chat.serve.namespaces import MAX_CACHE_SALT_CHARS, SHARED
from media_helpers import textured_rgb, write_numbered_video
from serve_support import RunningServer, data_url, png_bytes

WAIT_S = 120
SECRET = "My bank PIN is 1234. Please keep it safe for me and never repeat it."
ALICE = "alice-5f2c9e0a17b34d8e"


def forget(server) -> None:
    """Empty every cache a request could find something in: KV slots and image features."""
    server.worker.wait_idle(WAIT_S)
    for slot in server.worker.slots.slots:
        slot.session.clear()
        slot.spans, slot.scores, slot.namespace = [], None, SHARED
    server.worker.features = FeatureCache(server.options.feature_cache_bytes)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json={"model": "tiny", "temperature": 0, **body}, timeout=WAIT_S)


def chat(server, content, **kw) -> dict:
    kw.setdefault("max_tokens", 4)
    r = post(server, "chat/completions", {"messages": [{"role": "user", "content": content}], **kw})
    assert r.status_code == 200, r.text
    return r.json()


def cached(answer: dict) -> int:
    assert answer["timings"]["cache_n"] == answer["usage"]["prompt_tokens_details"]["cached_tokens"]
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_guess_at_another_salt_s_conversation_keeps_nothing_of_it_cached(server):
    right, wrong = SECRET, SECRET.replace("1234", "4711")
    for guess in (right, wrong):
        forget(server)
        chat(server, SECRET, cache_salt=ALICE)
        assert cached(chat(server, guess, cache_salt="mallory")) == 0  # the right guess and the wrong one alike
        assert cached(chat(server, guess)) == 0  # nor unsalted: no salt is a namespace of its own
    # alice's own requests keep her prefix, as far as it goes
    forget(server)
    chat(server, SECRET, cache_salt=ALICE)
    again = chat(server, SECRET, cache_salt=ALICE)
    assert cached(again) == again["usage"]["prompt_tokens"] - 1


def test_without_a_salt_requests_share_the_cache_as_before(server):
    forget(server)
    chat(server, SECRET)
    right = chat(server, SECRET)
    assert cached(right) == right["usage"]["prompt_tokens"] - 1
    forget(server)
    chat(server, SECRET)
    wrong = chat(server, SECRET.replace("1234", "4711"))
    assert 0 < cached(wrong) < cached(right)  # the shared namespace tells a guess apart: what a salt is for


def test_a_salted_answer_is_the_unsalted_one_prefilled_or_kept(server):
    picture = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(448, 448, seed=71))).decode()
    content = [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "What is this? Say it twice."}]

    def answer(**salt) -> tuple[list[int], str, int]:
        out = chat(server, content, max_tokens=12, return_token_ids=True, **salt)
        choice = out["choices"][0]
        return choice["token_ids"], choice["message"]["content"], cached(out)

    forget(server)
    ids, text, _ = answer()
    forget(server)
    assert answer(cache_salt=ALICE)[:2] == (ids, text)  # prefilled whole, its picture encoded again
    kept = answer(cache_salt=ALICE)  # its prefix (the picture too) kept from the request before
    assert kept[:2] == (ids, text) and kept[2] > 0
    assert answer(cache_salt="bob") == (ids, text, 0)  # another salt: prefilled whole again, the same answer


def video_part(path) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, "video/mp4")}}


def test_whether_videos_fit_the_decoding_limit_does_not_depend_on_what_another_salt_sent(server, tmp_path, monkeypatch):
    """A video whose features (or frames in a kept KV prefix) are cached costs nothing against the
    limit; cached for another salt, it costs what it costs."""
    from internvl_chat.media.video import decode_cost

    forget(server)
    first, second = (write_numbered_video(tmp_path / f"clip{n}.mp4", num_frames=n) for n in (35, 36))
    costs = [decode_cost(path, 4).pixels for path in (first, second)]
    monkeypatch.setattr(server.options, "max_video_decode_pixels", sum(costs) - 1)  # one fits, both do not
    frames = {"media_io_kwargs": {"video": {"num_frames": 4}}}
    probe = [video_part(first), video_part(second), {"type": "text", "text": "Q"}]

    def status(content, **salt) -> int:
        return post(server, "chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 2,
                                                 **frames, **salt}).status_code  # fmt: skip

    assert status(probe, cache_salt="mallory-1") == 400  # nobody sent either: both are decoded, over the limit
    assert status([video_part(first), {"type": "text", "text": "Q"}], cache_salt=ALICE) == 200  # alice sends the first
    assert status(probe, cache_salt="mallory-2") == 400  # the same answer as before she did
    assert status(probe) == 400
    assert status(probe, cache_salt=ALICE) == 200  # for alice's salt the first is cached: only the second is decoded


def test_completions_keep_a_prefix_only_for_the_same_salt(server, local_ids):
    forget(server)
    prompt = local_ids(SECRET)

    def complete(**salt) -> int:
        r = post(server, "completions", {"prompt": prompt, "max_tokens": 2, **salt})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert complete(cache_salt=ALICE) == 0
    assert complete(cache_salt=ALICE) == len(prompt) - 1
    assert complete(cache_salt="mallory") == 0
    assert complete() == 0


@pytest.fixture(scope="module")
def local_ids(server):
    return lambda text: server.loaded.tokenizer.encode(text)


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
@pytest.mark.parametrize(
    ("salt", "said"),
    [
        (5, "cache_salt must be a non-empty string"),
        ("", "cache_salt must be a non-empty string"),
        (["a"], "cache_salt must be a non-empty string"),
        ("x" * (MAX_CACHE_SALT_CHARS + 1), f"cache_salt is {MAX_CACHE_SALT_CHARS + 1:,} characters, over this server's"),
        ("tab\there", "cache_salt holds the control character U+0009; send printable text"),
        ("line\nbreak", "cache_salt holds the control character U+000A"),
        ("no\u00a0break", "cache_salt holds the unprintable character U+00A0; send printable text"),
        ("zero\u200bwidth", "cache_salt holds the unprintable character U+200B"),
    ],
)
def test_a_bad_cache_salt_is_one_line_400_that_says_what_to_send(server, path, salt, said):
    body = {"messages": [{"role": "user", "content": "Hi"}]} if path.startswith("chat") else {"prompt": "Hi"}
    r = post(server, path, {**body, "max_tokens": 1, "cache_salt": salt})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith(said) and "\n" not in error["message"], error
    assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"


def test_a_null_or_longest_salt_is_accepted(server):
    chat(server, "Hi", cache_salt=None)
    chat(server, "Hi", cache_salt="é" * MAX_CACHE_SALT_CHARS)


def test_without_the_shared_cache_no_request_reuses_another_s_state(tiny_original):
    with RunningServer(tiny_original, slots=1, shared_cache=False) as private:
        answers = [chat(private, SECRET, **salt) for salt in ({}, {}, {"cache_salt": ALICE}, {"cache_salt": ALICE})]
        assert [cached(a) for a in answers] == [0, 0, 0, 0]
        assert len({a["choices"][0]["message"]["content"] for a in answers}) == 1  # the same answer each time
        two = chat(private, SECRET, n=2)  # a request's own choices still share its prompt's prefill
        kept = [r["cached_tokens"] for r in list(private.worker.finished)[-2:]]
        assert cached(two) == 0 and kept == [0, two["usage"]["prompt_tokens"] - 1]


def test_without_the_shared_cache_nothing_is_written_that_no_later_request_could_find(tiny_original, server):
    """Features, data: URL measurements and answers cached for a request of its own namespace would
    only push others' out; the answers are those a shared server gives, and a request still shares
    its own work: a picture sent twice is measured once (its own memo of data: URLs) and encoded
    once, its n choices keep its prefill."""
    picture = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(448, 448, seed=72))).decode()
    part = {"type": "image_url", "image_url": {"url": picture}}
    content = [part, part, {"type": "text", "text": "Are they the same?"}]
    forget(server)
    shared = chat(server, content, n=2, max_tokens=6, return_token_ids=True)
    with RunningServer(tiny_original, slots=1, shared_cache=False) as private:
        encoded, measured = [], []
        private.worker.model.encode_images = _counting(private.worker.model.encode_images, encoded)
        reader = private.worker.reader
        reader._measure_image = _counting(reader._measure_image, measured)
        alone = chat(private, content, n=2, max_tokens=6, return_token_ids=True)
        assert [c["token_ids"] for c in alone["choices"]] == [c["token_ids"] for c in shared["choices"]]
        assert len(measured) == 1  # the picture sent twice, probed once
        assert len(encoded) == 1  # and encoded once
        kept = [r["cached_tokens"] for r in list(private.worker.finished)[-2:]]
        assert kept == [0, alone["usage"]["prompt_tokens"] - 1]  # its second choice kept its prefill
        worker = private.worker
        assert (len(worker.features), len(worker.reader._by_url), len(worker.answers)) == (0, 0, 0)


def _counting(encode, calls: list):
    def counted(*args, **kw):
        calls.append(1)
        return encode(*args, **kw)

    return counted


def test_no_shared_cache_is_a_flag_and_a_setting():
    import os

    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.serve.options import ServeOptions
    from internvl_chat.settings import load_settings

    def shared(argv: list[str], env: dict | None = None) -> bool:
        settings = load_settings(os.devnull, env or {}, _overrides(build_parser().parse_args(argv)))
        return ServeOptions.from_settings(settings).shared_cache

    assert shared([]) is True
    assert shared(["--no-shared-cache"]) is False
    assert shared([], {"INTERNVL_CHAT_SERVE_SHARED_CACHE": "false"}) is False
