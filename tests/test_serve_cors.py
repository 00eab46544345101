"""Browser clients: CORS for the origins `--allow-origin` names (none by default), the start-up
check of each origin, and HEAD on /v1/models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from internvl_chat.errors import UsageError
from internvl_chat.serve import main as serve_main
from internvl_chat.serve.errors import APIError
from internvl_chat.serve.options import ServeOptions
from internvl_chat.settings import load_settings

WAIT_S = 60
REPO = Path(__file__).resolve().parents[1]
PAGE = "http://localhost:3000"
KEY = "sk-cors-test"
# what a browser asks for before openai's JS client sends a chat request (lower case, sorted, as
# browsers write them): the key, the JSON, and the client's own x-stainless-* headers
ASKED_HEADERS = ",".join(["authorization", "content-type", *(f"x-stainless-{name}" for name in (
    "arch", "lang", "os", "package-version", "retry-count", "runtime", "runtime-version", "timeout"))])


def preflight(url: str, origin: str, path: str = "/v1/chat/completions", method: str = "POST") -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": ASKED_HEADERS}
    return httpx.options(f"{url}{path}", headers=headers, timeout=WAIT_S)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-")}


@pytest.fixture(scope="module")
def browser_server(tiny_original):
    """A server that lets one page's origin call it (written as a user might: upper case, the default port)."""
    from serve_support import RunningServer

    with RunningServer(tiny_original, api_key=KEY, allow_origins=["HTTP://LocalHost:3000", "https://app.example:443"]) as running:
        yield running


# --- off by default ------------------------------------------------------------------------------


def test_with_no_origin_allowed_no_answer_has_cors_headers_and_a_preflight_is_not_allowed(server):
    response = preflight(server.url, PAGE)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert cors_headers(response) == {}
    models = httpx.get(f"{server.url}/v1/models", headers={"Origin": PAGE}, timeout=WAIT_S)
    assert models.status_code == 200 and cors_headers(models) == {}


@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None])
def test_a_page_cannot_make_the_model_answer_with_a_post_it_needs_no_preflight_for(server, content_type):
    # text/plain, a form or an untyped body: a page's fetch sends it with no preflight. It ran (the
    # page could not read the answer, but with no API key any page the user opened kept the model busy)
    before = len(server.worker.finished)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    headers = {"Origin": "https://elsewhere.example"} | ({"Content-Type": content_type} if content_type else {})
    refused = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=WAIT_S)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
    assert cors_headers(refused) == {} and len(server.worker.finished) == before
    # no Origin (curl -d, any program) or a JSON body (which a page cannot send without a preflight): answered
    del headers["Origin"]
    assert httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=WAIT_S).status_code == 200
    as_json = {"Origin": "https://elsewhere.example", "Content-Type": "application/json"}
    assert httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=as_json, timeout=WAIT_S).status_code == 200


def test_an_allowed_page_may_post_without_a_preflight(browser_server):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    headers = {"Origin": PAGE, "Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{browser_server.url}/v1/chat/completions", content=body, headers=headers, timeout=WAIT_S)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE


def test_head_on_the_models_answers_as_get_without_a_body(server):
    for path in ("/v1/models", "/v1/models/tiny"):
        got, head = (httpx.request(method, f"{server.url}{path}", timeout=WAIT_S) for method in ("GET", "HEAD"))
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"] == "application/json"
        assert head.headers["content-length"] == str(len(got.content))
    unknown = httpx.head(f"{server.url}/v1/models/other", timeout=WAIT_S)
    assert unknown.status_code == 404 and unknown.content == b""


# --- an allowed origin ---------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_the_key(browser_server):
    response = preflight(browser_server.url, PAGE)
    assert response.status_code == 200
    headers = cors_headers(response)
    assert headers["access-control-allow-origin"] == PAGE  # as the browser sends it, not as it was written
    assert set(headers["access-control-allow-methods"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}
    assert headers["access-control-allow-headers"] == ASKED_HEADERS
    assert "access-control-allow-credentials" not in headers  # the key goes in a header, never in cookies
    assert preflight(browser_server.url, "https://app.example", "/v1/models", "GET").status_code == 200


def test_a_public_page_may_call_this_machine_when_its_origin_is_allowed(browser_server):
    # Chrome's private network access: a preflight from a public page to a local server asks for it
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Private-Network": "true"}  # fmt: skip
    response = httpx.options(f"{browser_server.url}/v1/models", headers=headers, timeout=WAIT_S)
    assert response.status_code == 200 and response.headers["access-control-allow-private-network"] == "true"


def test_a_full_queue_refuses_requests_but_not_preflights(browser_server, monkeypatch):
    def full() -> None:
        raise APIError(429, "the model is busy and its queue is full", code="queue_full", headers={"Retry-After": "1"})

    monkeypatch.setattr(browser_server.worker, "check_capacity", full)
    assert preflight(browser_server.url, PAGE).status_code == 200
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    refused = httpx.post(f"{browser_server.url}/v1/chat/completions", json=body, timeout=WAIT_S,
                         headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert refused.status_code == 429 and refused.headers["access-control-allow-origin"] == PAGE
    assert refused.headers["access-control-expose-headers"] == "Retry-After, retry-after-ms"  # the page may read when to retry


def test_a_page_may_read_every_header_that_says_when_to_retry(browser_server, monkeypatch):
    """A 429 says when to come back in retry-after-ms too (each refused client its own moment, which
    openai-node reads first); only Retry-After was exposed, so a page's client could not read it
    and came back in whole seconds, with every other page refused together."""
    worker = browser_server.worker
    # an earlier test's job may still be ending (its answer is sent before the worker clears `running`):
    # it would set `running` back to None under the busy one set here, and get it back at the teardown
    assert worker.wait_idle(WAIT_S)
    monkeypatch.setattr(worker, "_durations", __import__("collections").deque([0.25] * 4))
    monkeypatch.setattr(worker, "running", object())  # busy, with no room in its queue
    monkeypatch.setattr(worker.options, "queue_depth", 0)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    refused = httpx.post(f"{browser_server.url}/v1/chat/completions", json=body, timeout=WAIT_S,
                         headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})  # fmt: skip
    worker._told.clear()
    assert refused.status_code == 429 and "retry-after-ms" in refused.headers
    exposed = {name.strip().lower() for name in refused.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "retry-after-ms"} <= exposed


def test_answers_to_an_allowed_origin_carry_its_origin_a_refusal_too(browser_server):
    origin = {"Origin": PAGE}
    refused = httpx.get(f"{browser_server.url}/v1/models", headers=origin, timeout=WAIT_S)
    assert refused.status_code == 401  # a real request still needs the key; the page can read why
    assert refused.headers["access-control-allow-origin"] == PAGE
    models = httpx.get(f"{browser_server.url}/v1/models", headers={**origin, "Authorization": f"Bearer {KEY}"},
                       timeout=WAIT_S)  # fmt: skip
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == PAGE


def test_a_stream_to_an_allowed_origin_carries_its_origin(browser_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    headers = {"Origin": PAGE, "Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{browser_server.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=WAIT_S) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["access-control-allow-origin"] == PAGE
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_another_origin_gets_no_cors_headers(browser_server):
    other = "http://localhost:3001"  # another port is another origin
    response = preflight(browser_server.url, other)
    assert response.status_code == 403 and cors_headers(response) == {}
    assert response.json()["error"]["code"] == "origin_not_allowed"
    models = httpx.get(f"{browser_server.url}/v1/models", headers={"Origin": other, "Authorization": f"Bearer {KEY}"},
                       timeout=WAIT_S)  # fmt: skip
    assert models.status_code == 200 and cors_headers(models) == {}  # Retry-After exposed to allowed origins only


# --- answers made outside the CORS middleware ------------------------------------------------------


def test_an_internal_error_carries_the_cors_headers_of_an_allowed_origin_only(browser_server, server, monkeypatch):
    # the catch-all 500 is answered outside every middleware: a page saw "network error", not why
    def broken() -> None:
        raise RuntimeError("a bug")

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    for running in (browser_server, server):
        monkeypatch.setattr(running.worker, "check_capacity", broken)

    def post(running, origin: str) -> httpx.Response:
        return httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=WAIT_S,
                          headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})  # fmt: skip

    failed = post(browser_server, PAGE)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert cors_headers(failed) == {"access-control-allow-origin": PAGE, "access-control-expose-headers": "Retry-After, retry-after-ms"}
    other = post(browser_server, "http://localhost:3001")
    assert other.status_code == 500 and cors_headers(other) == {}
    unset = post(server, PAGE)  # no --allow-origin: no page is answered with them
    assert unset.status_code == 500 and cors_headers(unset) == {}


def _refused_by_the_connection_limit(origin: str | None, origins: tuple[str, ...]) -> dict[str, str]:
    """The headers of ConnectionLimit's 503 to a request from `origin`, one connection over its limit."""
    import asyncio

    from internvl_chat.serve.connections import ConnectionLimit

    limit = ConnectionLimit(object(), 0, origins)
    limit.opened(type("InUse", (), {"idle_since": lambda self: None})())  # the request's own: not idle
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"test")] + ([(b"origin", origin.encode())] if origin else [])
    asyncio.run(limit({"type": "http", "headers": headers}, None, send))
    assert sent[0]["status"] == 503
    return {name.decode(): value.decode() for name, value in sent[0]["headers"]}


def test_the_connection_limits_503_carries_the_cors_headers_of_an_allowed_origin_only():
    listed = _refused_by_the_connection_limit(PAGE, (PAGE,))
    assert listed["access-control-allow-origin"] == PAGE and listed["retry-after"] == "1"
    assert listed["access-control-expose-headers"] == "Retry-After, retry-after-ms"
    assert _refused_by_the_connection_limit(PAGE, ("*",))["access-control-allow-origin"] == "*"
    for origin, origins in ((PAGE, ("http://localhost:3001",)), (PAGE, ()), (None, (PAGE,))):
        assert not any(name.startswith("access-control-") for name in _refused_by_the_connection_limit(origin, origins))


class _HeadTransport:
    """What a head's deadline writes, closes and asks of a connection (no socket)."""

    def __init__(self):
        self.written, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class _Deadlines:
    """The loop's call_later, its timers fired by the test (no time passes)."""

    def __init__(self):
        self.pending: list = []

    def call_later(self, delay, callback, *args):
        timer = type("Timer", (), {"cancel": lambda timer: self.pending.remove(timer)})()
        timer.fire = lambda: callback(*args)
        self.pending.append(timer)
        return timer


def _head_timed_out(head: bytes, origins: tuple[str, ...]) -> bytes:
    """What a connection that sent `head` and no more gets when its head deadline passes."""
    import uvicorn
    from uvicorn.server import ServerState

    from internvl_chat.serve.connections import ConnectionLimit, bounded_h11

    clock, transport = _Deadlines(), _HeadTransport()
    protocol = bounded_h11(10.0, 10.0, ConnectionLimit(object(), 5, origins))(uvicorn.Config(app=object()),
                                                                               ServerState(), {}, _loop=clock)  # fmt: skip
    protocol.connection_made(transport)
    protocol.data_received(head)
    [deadline] = clock.pending
    deadline.fire()
    assert transport.closed and transport.written.startswith(b"HTTP/1.1 408 ")
    return transport.written


def test_the_408_of_a_slow_head_carries_the_cors_headers_of_an_allowed_origin_only():
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nOrigin: {PAGE}\r\nX-Slow: aaa".encode()
    answer = _head_timed_out(head, (PAGE,))
    assert f"\r\nAccess-Control-Allow-Origin: {PAGE}\r\n".encode() in answer
    assert b"\r\nAccess-Control-Expose-Headers: Retry-After, retry-after-ms\r\n" in answer
    assert b'"request_timeout"' in answer
    for unlisted in (_head_timed_out(head, ("http://localhost:3001",)), _head_timed_out(head, ())):
        assert b"access-control-" not in unlisted.lower()
    # an Origin line not yet complete, or given twice, is no origin
    cut = f"POST / HTTP/1.1\r\nHost: test\r\nOrigin: {PAGE}".encode()
    twice = f"POST / HTTP/1.1\r\nOrigin: {PAGE}\r\nOrigin: {PAGE}\r\nX-Slow: a".encode()
    for head in (cut, twice):
        assert b"access-control-" not in _head_timed_out(head, (PAGE,)).lower()


def test_a_method_the_api_does_not_take_is_refused_in_openais_shape(browser_server):
    response = preflight(browser_server.url, PAGE, "/v1/models", "DELETE")
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("a browser may send only GET, HEAD and POST")


def test_a_head_with_the_key_from_an_allowed_origin_passes_its_preflight(browser_server):
    # fetch(url, {method: "HEAD", headers: {Authorization}}) is preflighted: the routes take HEAD
    response = preflight(browser_server.url, PAGE, "/v1/models", "HEAD")
    assert response.status_code == 200 and cors_headers(response)["access-control-allow-origin"] == PAGE
    head = httpx.head(f"{browser_server.url}/v1/models", headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"},
                      timeout=WAIT_S)  # fmt: skip
    assert head.status_code == 200 and head.headers["access-control-allow-origin"] == PAGE


# --- the start-up check --------------------------------------------------------------------------


def start(*flags: str) -> None:
    """serve's start as far as its flags and settings go (the model folder is never read)."""
    args = serve_main.build_parser().parse_args(["--model", "unused", *flags])
    settings = load_settings(os.devnull, {}, serve_main._overrides(args), serve_main.serve_setting_flags().names())
    ServeOptions.from_settings(settings)


@pytest.mark.parametrize(
    "origin, said",
    [
        ("localhost:3000", "it starts with http:// or https://, e.g. http://localhost:3000"),
        ("ftp://files.example", "it starts with http:// or https://"),
        ("http://localhost:3000/", "has more than an origin (a path, query or fragment); write http://localhost:3000"),
        ("https://App.example/chat?x=1#top", "write https://app.example"),
        ("http://me:pw@localhost:3000", "holds a user name or password"),
        ("http://localhost:0", "no valid port"),
        ("http://localhost:", "no valid port"),
        ("http://", "no valid host"),
        ("http://bad_host", "no valid host"),
        ("http://local host", "without spaces"),
        ("http://localhost\x1b[2J", "without spaces"),
        ("null", "it starts with http:// or https://"),
        # browsers send these rewritten (or not at all): kept as written, they would never match
        ("http://[1::2::3]:3000", "no valid IPv6 address"),
        ("http://[:::::]", "no valid IPv6 address"),
        ("http://127.1:3000", "no valid IPv4 address: write its four numbers from 0 to 255"),
        ("http://999.0.0.1", "no valid IPv4 address"),
        ("http://010.0.0.1", "no valid IPv4 address"),
        ("http://app.123", "no valid IPv4 address"),
    ],
)  # fmt: skip
def test_a_bad_origin_is_refused_at_start_in_one_line_that_says_what_to_write(origin, said):
    with pytest.raises(UsageError) as caught:
        start("--allow-origin", PAGE, "--allow-origin", origin)
    message = str(caught.value)
    assert message.startswith("--allow-origin: ") and said in message, message
    assert "\n" not in message and "\x1b" not in message


def test_serve_with_a_bad_origin_stops_before_loading_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(tmp_path / "absent"),
                          "--allow-origin", "localhost:3000"], capture_output=True, text=True, env=env, timeout=WAIT_S,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["internvl-chat: error: --allow-origin: 'localhost:3000' is not an origin: "
                                               "it starts with http:// or https://, e.g. http://localhost:3000; fix the value."]  # fmt: skip


def test_origins_are_kept_as_browsers_send_them():
    args = serve_main.build_parser().parse_args(["--allow-origin", "HTTPS://Example.COM:443", "--allow-origin",
                                                 "http://[::1]:8080,http://example.com:80", "--allow-origin", "http://[::1]:8080"])  # fmt: skip
    settings = load_settings(os.devnull, {}, serve_main._overrides(args))
    assert ServeOptions.from_settings(settings).allow_origins == ("https://example.com", "http://[::1]:8080", "http://example.com")
    from_env = load_settings(os.devnull, {"INTERNVL_CHAT_SERVE_ALLOW_ORIGINS": "http://a.example, http://b.example:8080"})
    assert from_env.serve.allow_origins == ["http://a.example", "http://b.example:8080"]


def test_ip_addresses_are_kept_as_browsers_write_them_in_an_origin():
    # WHATWG's serializer: the first longest run of zero groups as ::, lower case, no dotted IPv4 tail
    args = serve_main.build_parser().parse_args(["--allow-origin", "http://[0:0:0:0:0:0:0:1]:3000,http://[::FFFF:127.0.0.1]",
                                                 "--allow-origin", "https://[2001:DB8:0:0:1:0:0:1]:443,http://[1:0:1:0:1:0:1:0]",
                                                 "--allow-origin", "http://127.0.0.1:8080,http://1password.example"])  # fmt: skip
    settings = load_settings(os.devnull, {}, serve_main._overrides(args))
    assert ServeOptions.from_settings(settings).allow_origins == (
        "http://[::1]:3000", "http://[::ffff:7f00:1]", "https://[2001:db8::1:0:0:1]", "http://[1:0:1:0:1:0:1:0]",
        "http://127.0.0.1:8080", "http://1password.example")  # fmt: skip


def test_every_origin_needs_an_api_key_and_is_refused_without_one():
    with pytest.raises(UsageError) as caught:
        start("--allow-origin", "*")
    assert "set --api-key KEY too" in str(caught.value) and "\n" not in str(caught.value)
    start("--allow-origin", "*", "--api-key", KEY)  # with a key it starts
    start("--allow-origin", PAGE)  # a named origin needs no key


def test_a_bad_origin_in_the_config_file_names_the_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[serve]\nallow_origins = ["http://localhost:3000/app"]\n', encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        load_settings(config, {})
    assert str(caught.value) == (f"{config}: serve.allow_origins 'http://localhost:3000/app' has more than an origin "
                                 "(a path, query or fragment); write http://localhost:3000; fix the value.")  # fmt: skip
