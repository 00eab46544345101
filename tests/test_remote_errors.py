"""Every way a server can fail becomes one line (HTTP status first) and the conversation is kept."""

from __future__ import annotations

import itertools
import json
import re
import threading
import types

import pytest
from remote_helpers import FIXTURES, FakeServer, Reply, deaf_server, dripping_server, fixture, refusing_port, tls_server

from internvl_chat.chat import remote_http, remote_stream
from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.remote_errors import error_text, redirect_hint, wait_asked
from internvl_chat.chat.remote_http import ApiClient, normalize_base_url
from internvl_chat.chat.remote_sockets import HeadWatch, HttpAnswerCheck, NotHttpAnswer
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.errors import InternVLChatError, RemoteError, UsageError

GOOD = fixture("vllm/stream.sse")
ROLE = GOOD[: GOOD.index(b"\n\n") + 2]  # the first event: the assistant's role, no text yet
ERROR_AT_ONCE = fixture("lmdeploy/stream_error.sse").split(b"\n\n", 1)[1]  # its error event, with no text before it
DEEP = b"[" * 10_000 + b"]" * 10_000  # valid JSON nested deeper than Python's recursion limit


@pytest.fixture(autouse=True)
def clients_closed():
    """Every ApiClient a test makes is closed as the test ends: the conversations most tests leave
    open kept their pooled sockets, reported unclosed (ResourceWarning) at a later test's collection.
    Patched by hand, not with monkeypatch, whose undo() some tests call midway."""
    made: list[ApiClient] = []
    real_init = ApiClient.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    ApiClient.__init__ = recording_init
    try:
        yield
    finally:
        ApiClient.__init__ = real_init
        for client in made:
            client.close()


def conversation_with_one_turn(server: FakeServer, timeout: float = 300.0) -> RemoteConversation:
    return conversation_with_one_turn_at(server, server.url, timeout)


def conversation_with_one_turn_at(server: FakeServer, url: str, timeout: float = 300.0) -> RemoteConversation:
    server.chat(Reply.sse(GOOD))
    conv = RemoteConversation.connect(url, timeout=timeout, params=SamplingParams(max_new_tokens=8))
    list(conv.ask("first"))
    return conv


def with_timeout(conv: RemoteConversation, timeout: float) -> RemoteConversation:
    """The same conversation, its next requests timing out after `timeout` s. The handshake and
    first turn ran with the default: a short timeout there would fail whenever a busy machine
    delays the test server's thread, and test only how busy the machine is."""
    conv.client.close()
    conv.client = ApiClient(conv.client.base_url, "", timeout)
    return conv


def stepping_clock(monkeypatch, step_s: float = 100.0) -> None:
    """The clock that bounds a whole body or the time between stream events, advanced `step_s`
    at every reading: the default 300 s bound is passed after a few pieces of a trickle, however
    busy the machine (a short real timeout would also bound how soon the server's first byte
    comes), and a bound restarted by every piece, the bug, is never passed."""
    ticks = itertools.count(step=step_s)
    monkeypatch.setattr(remote_stream, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))


def fails_with(conv: RemoteConversation, pattern: str) -> str:
    """Ask once more, expect a RemoteError matching `pattern`; the first turn must be untouched."""
    before = [(t.user_text, t.reply) for t in conv.turns]
    with pytest.raises(RemoteError) as err:
        list(conv.ask("second"))
    line = str(err.value)
    assert "\n" not in line and "Traceback" not in line
    assert err.value.exit_code == 1
    assert __import__("re").search(pattern, line), line
    assert [(t.user_text, t.reply) for t in conv.turns] == before
    return line


def asks_again_on(conv: RemoteConversation, good: ApiClient, server: FakeServer) -> None:
    """Back on a working server, the conversation's next turn goes through: the failure lost nothing."""
    conv.client = good
    server.chat(Reply.sse(GOOD))
    list(conv.ask("again"))
    assert [t.user_text for t in conv.turns] == ["first", "again"]


@pytest.mark.parametrize(
    ("reply", "pattern"),
    [
        (Reply.json(fixture("lmdeploy/error_flat.json"), 401),
         r"^the server answered 401 Unauthorized: Please request with valid api key! \(authentication_error\); check --api-key"),
        (Reply.json(fixture("vllm/error_nested.json"), 400),
         r"^this turn and its answer do not fit the server's 32,768-token context \(the server said: This model's maximum "
         r"context length is 32768 tokens\. However, you requested 33050 tokens .{20,80}…\); a shorter message, "
         r"/undo or /clear, or a smaller max_new_tokens$"),  # the server's words cut: its counts come first
        (Reply.json(fixture("vllm/error_flat.json"), 404),
         r"^the server answered 404 Not Found: The model `InternVL3-9B` does not exist\..*--remote-model"),
        (Reply.json(fixture("llamacpp/error_nested.json"), 400),
         r"^this turn and its answer do not fit the server's 32,768-token context \(the server said: the request exceeds "
         r"the available context size, try increasing it\); "),
        (Reply.json({"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}, 422),
         r"^the server answered 422 Unprocessable (Entity|Content): field required; .*--dialect generic"),
        (Reply.json({"error": "slow down"}, 429, {"Retry-After": "7"}),
         r"^the server answered 429 Too Many Requests: slow down; the server is busy; try again later \(it asks to wait 7 s\)$"),
        (Reply.json({"error": "slow down"}, 429, {"Retry-After": "\xb2"}),  # a Latin-1 digit that int() refuses
         r"^the server answered 429 Too Many Requests: slow down; the server is busy; try again later$"),
        (Reply.json({"error": "slow down"}, 503, {"Retry-After": "9" * 5000}),  # over int()'s 4300 digits
         r"^the server answered 503 Service Unavailable: slow down; the server cannot take requests now \(busy, starting "
         r"or stopping\); try again later, or look at its log \(it asks to wait over a day\)$"),
        (Reply.json({"error": "slow down"}, 429, {"Retry-After": "999999"}),  # was "wait 999999 s"
         r"^the server answered 429 Too Many Requests: slow down; the server is busy; try again later \(it asks to wait "
         r"over a day\)$"),
        (Reply.json({"error": "slow down"}, 429, {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}),  # an HTTP date
         r"^the server answered 429 Too Many Requests: slow down; the server is busy; try again later \(it asks to wait "
         r"over a day\)$"),
        (Reply.json({"error": "slow down"}, 429, {"Retry-After": "soon \x1b[31m"}),  # neither: not shown at all
         r"^the server answered 429 Too Many Requests: slow down; the server is busy; try again later$"),
        # a streamed request's error sent as JSON under the event stream's type: it said "the stream closed early"
        (Reply.sse(b'{"error": {"message": "model is overloaded \\u001b[31m", "type": "server_error"}}'),
         r"^the server answered with an error: model is overloaded \\e\[31m \(server_error\); ask again$"),
        (Reply.sse(b"\xef\xbb\xbf\r\n" + fixture("lmdeploy/error_flat.json"), piece_size=2),
         r"^the server answered with an error: .+; ask again$"),
        # a page or text under the event stream's type (a sign-in proxy): it said "the stream closed early"
        (Reply.sse(b"<!DOCTYPE html><html><head><title>Sign in \x1b[31m</title></head><body>SSO</body></html>", piece_size=9),
         r"^the server's event stream held no event \(an HTML page: Sign in \\e\[31m\); is --server the API root of an "
         r"OpenAI-compatible server \(…/v1\)\?$"),
        (Reply.sse(b'error: {"code": 400, "message": "the prompt has \\u001b[2J 9 tokens too many", "type": "invalid_request_error"}\n\n'),
         r"^the server stopped the answer with an error: the prompt has \\e\[2J 9 tokens too many \(invalid_request_error\); "
         r"ask again$"),  # llama.cpp's error line: it said "the stream closed early"
        (Reply.sse(b"Internal Server Error\n"),
         r"^the server's event stream held no event \(its first line: Internal Server Error\); is --server the API root"),
        (Reply(503, [b"<html><body>Bad gateway \x1b[31m</body></html>"], "text/html"),  # a proxy's page: its text, escaped
         r"^the server \(or a proxy in front of it\) answered 503 Service Unavailable: Bad gateway \\e\[31m; check that "
         r"the server is running, or try again later$"),
        (Reply.sse(ERROR_AT_ONCE),
         r"^the server stopped the answer with an error: the engine stopped: out of KV cache blocks \(server_error\); ask again$"),
        (Reply.sse(b"event: error\ndata: {\"message\": \"overloaded\"}\n\n"),
         r"^the server stopped the answer with an error: overloaded"),
        (Reply.sse(b"data: {\"id\": 1, \"choices\": [\n\n"), r"stream event that is not JSON"),
        (Reply.sse(b"data: [1, 2]\n\n"), r"not an object"),
        (Reply.sse(b"data: " + DEEP + b"\n\n"), r"stream event that is not JSON"),
        (Reply(200, [DEEP], "application/json"), r"^the server's answer is not valid JSON"),
        (Reply(500, [b'{"error": ' + DEEP + b"}"], "application/json"), r"^the server answered 500 Internal Server Error: \{\"error\": \[\[\["),
        (Reply.sse(b"data: {\"choices\": 1}\n\ndata: [DONE]\n\n"), r"^the server sent a stream chunk whose choices is not a list"),
        (Reply.sse(b"data: {\"choices\": true}\n\n"), r"choices is not a list.*--dialect generic"),
        (Reply(200, [b"<html>hello</html>"], "text/html"), r"answered with text/html \(an HTML page: hello\), not an event stream"),
        (Reply(200, [b"hi"], "text/\x1b[2J" + "x" * 50_000),  # the head may be ~100 KB: the type is cut, escaped
         r"^the server answered with text/\\e\[2jx{40,60}…, not an event stream; .{,80}$"),
        (Reply(308, [b"<html>moved</html>"], "text/html", {"Location": "https://elsewhere.example/v1/chat/completions"}),
         r"^the server answered 308 Permanent Redirect: moved; it redirects to "
         r"https://elsewhere\.example/v1/chat/completions, which is not followed; check --server$"),
        # it said "check --server (https?)" wherever the redirect led
        (Reply(301, [b"<html><title>301 Moved Permanently</title></html>"], "text/html",
               {"Location": "https://127.0.0.1/v1/chat/completions"}),
         r"^the server answered 301 Moved Permanently; it redirects to https://127\.0\.0\.1/v1/chat/completions, which is "
         r"not followed; use https:// and port 443 in --server$"),  # the fake server's port is another
        (Reply(307, [b""], "text/plain", {"Location": "/api/v1/chat/completions"}),
         r"^the server answered 307 Temporary Redirect; it redirects to /api/v1/chat/completions, which is not followed; "
         r"check the path in --server \(the API root, which usually ends in /v1\)$"),
        (Reply(302, [b""], "text/html", {"Location": "http://[::1\x1b[2J/v1"}),  # httpx cannot parse it
         r"^the server answered 302 Found; it redirects to http://\[::1\\e\[2J/v1, which is not followed; check --server"),
        # a stream that breaks before any text: nothing to keep (tests/test_remote_broken.py: after some text)
        (Reply.sse(ROLE), r"^the server closed the stream before the answer finished; ask again$"),
        (Reply.sse(ROLE, end="reset"), r"^the connection to http://127\.0\.0\.1:\d+/v1 broke (in the middle of the answer|"
         r"before the answer began) \(.*\); ask again$"),  # the RST may drop the head too
        # a role-only chunk is no answer text yet (it said "in the middle of the answer")
        (Reply.sse(ROLE, end="cut"), r"broke before the answer began"),
        (Reply.sse(b"", end="reset"), r"broke before the answer began"),
    ],
    ids=["401-flat", "400-nested", "404-old-vllm", "400-llamacpp", "422-fastapi", "429-retry-after", "429-retry-after-superscript", "503-retry-after-huge", "429-retry-after-absurd", "429-retry-after-date", "429-retry-after-text", "json-error-as-sse", "json-error-as-sse-split", "html-as-sse", "llamacpp-error-line", "text-as-sse", "503-html",
         "error-event-at-once", "event-error", "bad-json", "not-object", "deep-event", "deep-json", "deep-error", "choices-int", "choices-bool", "not-sse", "not-sse-hostile-type", "redirect", "redirect-to-https", "redirect-path", "redirect-bad-location", "no-finish", "reset", "cut",
         "reset-at-once"],  # fmt: skip
)
def test_failures_are_one_line_and_keep_the_conversation(reply, pattern):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(reply)
        fails_with(conv, pattern)
        server.chat(Reply.sse(GOOD))
        list(conv.ask("again"))  # and the conversation goes on
        assert [t.user_text for t in conv.turns] == ["first", "again"]


def test_a_silent_server_times_out():
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = with_timeout(conversation_with_one_turn(server), 0.5)
        server.chat(Reply.sse(GOOD[:100], end="hang"))
        fails_with(conv, r"^the server sent nothing for 0\.5 s; .*raise \[remote\] timeout")


@pytest.mark.parametrize(
    ("first", "drip"),
    [(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"), (b"", b"HTTP/1.1 100 Continue\r\n\r\n")],
    ids=["a-head-trickled", "endless-100-continue"],
)
def test_a_head_that_never_ends_times_out(first, drip, monkeypatch):
    """Every byte restarts the read timeout, so a head sent a byte at a time (up to httpcore's
    100 KB) or `100 Continue` heads without end held a request, a one-shot run, forever. The head
    must come within the timeout of the request's end: shortened here to 0.5 s, the reads' own
    timeout left at 300 s (a read timeout would be a busy machine, not what is tested)."""
    with FakeServer(fixture("vllm/models.json")) as server, dripping_server(first, drip) as slow:
        conv = conversation_with_one_turn(server)
        monkeypatch.setattr(remote_http, "HeadWatch", lambda sockets, timeout: HeadWatch(sockets, 0.5))
        good = conv.client
        conv.client = ApiClient(slow, "", 300.0)
        fails_with(conv, r"^the server took over 300 s to send the head of its answer; .*raise \[remote\] timeout")
        with pytest.raises(RemoteError, match=r"^the server took over 300 s to send the head of its answer"):
            RemoteConversation.connect(slow)
        conv.client.close()
        monkeypatch.undo()  # a busy machine could delay a good head by 0.5 s
        asks_again_on(conv, good, server)

def test_a_head_too_late_on_a_kept_connection_is_not_waited_for_twice(monkeypatch, kept_connections):
    """The head's time limit shuts the connection, which then reads as one the server closed:
    a request sent again would wait as long once more."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)  # its connection kept
        monkeypatch.setattr(remote_http, "HeadWatch", lambda sockets, timeout: HeadWatch(sockets, 0.5))
        server.chat(Reply(end="mute"), Reply.sse(GOOD))
        fails_with(conv, r"^the server took over 300 s to send the head of its answer")
        assert len(server.chat_bodies_once(2)) == 2 and server.connections == 1  # the first turn's, and this one


def test_a_cancel_before_the_head_on_a_kept_connection_sends_nothing_again(kept_connections):
    """A cancel shuts the connection, which then reads as one the server closed."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply(end="mute"), Reply.sse(GOOD))
        cancel = threading.Event()
        trace = conv.client.trace

        def spy(event: str, info: dict) -> None:
            trace(event, info)
            if event == "http11.send_request_body.complete":
                cancel.set()

        conv.client.trace = spy
        assert list(conv.ask("second", cancel=cancel))[-1]["finish_reason"] == "cancelled"
        assert len(server.chat_bodies_once(2)) == 2 and server.connections == 1


@pytest.mark.parametrize(
    "body",
    [{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},  # llama.cpp, starting
     {"error": {"message": "the engine is not running", "code": "engine_unavailable"}}],  # serve
)  # fmt: skip
def test_a_servers_own_503_says_it_is_unavailable_for_now_not_that_it_failed(body):
    """A 503 is a server that cannot take requests for now; "the server failed" sent the user to
    its log while llama.cpp was still loading its model."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.json(body, 503, {"Retry-After": "5"}))
        line = fails_with(conv, r"^the server answered 503 Service Unavailable: .*; the server cannot take requests now "
                                r"\(busy, starting or stopping\); try again later, or look at its log \(it asks to wait 5 s\)$")
        assert "failed" not in line


def test_a_server_that_stops_reading_the_request_says_so_and_keeps_the_conversation():
    """A server that never reads the request (overloaded, or wedged) ended it at the write timeout
    with httpx's own words: "talking to … timed out (timed out); try again". The request here is
    far larger than the sockets' buffers, so it cannot be sent whole however fast the machine is."""
    with FakeServer(fixture("vllm/models.json")) as server, deaf_server() as deaf:
        conv = conversation_with_one_turn(server)
        good = conv.client
        conv.client = ApiClient(deaf, "", 0.5)
        try:
            with pytest.raises(RemoteError) as err:
                list(conv.ask("x" * (64 << 20)))
        finally:
            conv.client.close()
        line = str(err.value)
        assert re.match(r"the server took no more of the request for 0\.5 s; .*raise \[remote\] timeout", line), line
        assert [t.user_text for t in conv.turns] == ["first"]
        asks_again_on(conv, good, server)


@pytest.mark.parametrize(
    ("head", "said"),
    [(b"\x15\x03\x01\x00\x02\x02\x50",  # a TLS server's alert: --server says http:// where it wants https://
      r"what answers at http://127\.0\.0\.1:\d+/v1 is not an HTTP server \(it began with: \\x15.+\)"),
     (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (200 << 10) + b"\r\n\r\n",  # a head past httpcore's 100 KB
      r"the answer of http://127\.0\.0\.1:\d+/v1 is not valid HTTP \(.+\)")],
    ids=["tls-alert", "huge-head"],
)  # fmt: skip
def test_an_answer_that_is_not_http_says_to_check_the_server_not_to_ask_again(head, said):
    """A head h11 cannot parse said "the connection … broke before the answer began (illegal request
    line); ask again": asking again gets the same."""
    with FakeServer(fixture("vllm/models.json")) as server, dripping_server(head, b"", seconds=1.0) as bad:
        conv = conversation_with_one_turn(server)
        good = conv.client
        conv.client = ApiClient(bad, "", 300.0)
        line = fails_with(conv, rf"^{said}; check --server \(its port, and http:// or https://\)$")
        assert "ask again" not in line
        with pytest.raises(RemoteError, match=said):
            RemoteConversation.connect(bad)
        conv.client.close()
        asks_again_on(conv, good, server)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0 s"), ("59", "59 s"), ("90", "2 minutes"), ("3569", "59 minutes"), ("3599", "about 1 hour"),
     ("7200", "about 2 hours"), ("86400", "about a day"), ("999999", "over a day"), ("9" * 5000, "over a day"),
     ("Sat, 05 Dec 2026 12:02:00 GMT", "2 minutes"), ("Sat, 05 Dec 2026 12:00:30 -0000", "30 s"),
     ("Sat, 05 Dec 2026 11:00:00 GMT", None), ("-5", None), ("1.5", None), ("\xb2", None), ("", None), (None, None)],
)  # fmt: skip
def test_a_retry_after_is_said_as_a_person_would_say_the_wait(value, shown):
    """Retry-After was shown as sent, "wait 999999 s", and an HTTP date (which the header may be) not at all."""
    noon = 1796472000.0  # Sat, 05 Dec 2026 12:00:00 GMT
    assert wait_asked(value, now=noon) == shown


@pytest.mark.parametrize(
    ("requested", "location", "hint"),
    [("http://gpu/v1/models", "https://gpu/v1/models", "use https:// in --server"),
     ("http://gpu:8000/v1/models", "https://gpu:8000/v1/models", "use https:// in --server"),
     ("http://gpu:8000/v1/models", "https://gpu/v1/models", "use https:// and port 443 in --server"),
     ("http://gpu:8000/v1/models", "https://gpu:8443/v1/models", "use https:// and port 8443 in --server"),
     ("http://gpu:80/v1/models", "https://gpu/v1/models", "use https:// and port 443 in --server"),
     ("http://gpu:8000/v1/models", "/api/v1/models", "check the path in --server (the API root, which usually ends in /v1)"),
     ("http://gpu/v1/models", "http://gpu:80/api/v1/models", "check the path in --server (the API root, which usually ends in /v1)"),
     ("http://gpu:8000/v1/models", "http://gpu:9000/v1/models", "check --server"),
     ("http://gpu:8000/v1/models", "https://gpu:99999/v1/models", "check --server")],
)  # fmt: skip
def test_a_redirect_to_another_port_is_not_said_to_be_fixed_by_https_or_the_path(requested, location, hint):
    """--server http://gpu:8000 redirected to https://gpu/… said "use https:// in --server", which
    leads to https://gpu:8000, where nothing speaks TLS; one to http://gpu:9000 said "check the path"."""
    assert redirect_hint(location, requested).endswith(f", which is not followed; {hint}")


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH_9.6\r\n", b"S", b"HTTX"], ids=["ssh", "one-byte", "near-http"])
def test_a_server_that_sends_a_line_of_another_protocol_and_waits_is_not_http_at_once(banner):
    """An SSH server at the --server port sends its banner line and waits: h11 waits for a whole
    head, so the request ended at the head's timeout with "it may be overloaded: try again". The
    first bytes that cannot start "HTTP/" say it at once, as a TLS alert's do."""
    with dripping_server(banner, b"", seconds=120.0) as ssh:
        client = ApiClient(ssh, "", 60.0)  # the head's timeout: well past the test's own run
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=8))
        with pytest.raises(RemoteError) as err:
            list(conv.ask("hi"))
        shown = banner.decode().strip()
        assert str(err.value) == (f"what answers at {ssh} is not an HTTP server (it began with: {shown}); "
                                  "check --server (its port, and http:// or https://)")  # fmt: skip
        with pytest.raises(RemoteError, match=r"^what answers at .* is not an HTTP server \(it began with: "):
            RemoteConversation.connect(ssh)  # the handshake's GET /models alike
        client.close()


class PiecesStream:
    """A connection whose reads return `pieces`, one each (what the network delivers in parts)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_an_answer_whose_first_bytes_came_in_two_reads_is_shown_whole():
    """The answer's start that came in an earlier read ("HT" of "HTX…") was left out of what it
    began with: it read "X…"."""
    stream = HttpAnswerCheck(PiecesStream([b"HT", b"X-protocol 1\r\n"]))
    stream.write(b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\n\r\n")
    assert stream.read(65536) == b"HT"
    with pytest.raises(NotHttpAnswer) as err:
        stream.read(65536)
    assert err.value.began == b"HTX-protocol 1\r\n"


def test_an_answer_that_begins_with_a_line_break_says_what_came_after_it():
    """A stray CRLF before the status line (h11 takes none) said "(it began with: )": the first line
    shown was the empty one."""
    with dripping_server(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", seconds=1.0) as odd:
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect(odd)
    assert str(err.value) == (f"what answers at {odd} is not an HTTP server (it began with: \\r\\nHTTP/1.1 200 OK); "
                              "check --server (its port, and http:// or https://)")  # fmt: skip


@pytest.mark.parametrize(
    "pieces",
    [[b": ping\n\n"], [b"\n"], [GOOD[: GOOD.index(b"\n\n") + 2], b"data: ", b"x"]],
    ids=["keep-alives", "blank-lines", "a-line-that-never-ends"],
)
def test_a_server_that_only_keeps_the_stream_alive_times_out(pieces, monkeypatch):
    """Every byte restarts the read timeout, so a server that sends only keep-alives (or a line
    that never ends) would hold the answer, and a one-shot run, forever."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        stepping_clock(monkeypatch)
        server.chat(Reply(pieces=pieces, end="endless"))
        fails_with(conv, r"^the server sent no stream event for 300 s \(only keep-alives or an unfinished line\); "
                         r".*raise \[remote\] timeout")


def test_blank_lines_before_the_first_event_are_bounded_once(monkeypatch):
    """The blank lines that came before anything else were waited for twice: up to the timeout to
    see whether the body is JSON, then as long again as the stream's own bound (600 s for 300)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        readings: list[float] = []  # the stepping clock's, kept
        ticks = itertools.count(step=100.0)

        def monotonic() -> float:
            readings.append(next(ticks))
            return readings[-1]

        monkeypatch.setattr(remote_stream, "time", types.SimpleNamespace(monotonic=monotonic))
        server.chat(Reply(pieces=[b"\n"], end="endless"))
        fails_with(conv, r"^the server sent no stream event for 300 s")
        assert readings[-1] - readings[0] < 2 * 300.0, readings


@pytest.mark.parametrize(
    "reply",
    [Reply(401, [b"{", b" "], "application/json", end="endless"), Reply(200, [b"{", b" "], "application/json", end="endless")],
    ids=["error-body", "whole-answer"],
)
def test_a_body_trickled_byte_by_byte_times_out(reply, monkeypatch):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        stepping_clock(monkeypatch)
        server.chat(reply)
        fails_with(conv, r"^the server took over 300 s to send its answer \([\d,]+ bytes so far\); .*raise \[remote\] timeout")
        server.replies["/v1/models"].append(Reply(200, [b"{", b" "], "application/json", end="endless"))
        with pytest.raises(RemoteError, match=r"^the server took over 300 s to send its answer"):
            RemoteConversation.connect(server.url)


def test_connection_refused_at_the_start_and_mid_conversation():
    with refusing_port() as port, pytest.raises(
        RemoteError, match=rf"^cannot connect to http://127\.0\.0\.1:{port}/v1 \(.*\); is the server running\? check --server$"
    ):
        RemoteConversation.connect(f"127.0.0.1:{port}")
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
    # the server is gone now
    fails_with(conv, r"^cannot connect to .*is the server running")


def test_https_to_a_plain_http_server_says_to_use_http():
    """It said "is the server running?" of a server that was running, only without TLS."""
    with FakeServer(fixture("vllm/models.json")) as server:
        url = server.url.replace("http://", "https://")
        with pytest.raises(RemoteError, match=r"^cannot connect to https://.*: the server does not speak TLS; use http://"):
            RemoteConversation.connect(url)


def test_a_server_certificate_not_trusted_says_so_and_how_to_trust_it(monkeypatch):
    """A self-signed or private CA's certificate failed as "…; is the server running? check --server"."""
    with tls_server() as port:
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect(f"https://127.0.0.1:{port}/v1", timeout=30)
        monkeypatch.setenv("SSL_CERT_FILE", str(FIXTURES / "tls" / "cert.pem"))  # what the line says to do
        with pytest.raises(RemoteError, match="^the connection to .* broke before the answer began"):  # trusted now
            RemoteConversation.connect(f"https://127.0.0.1:{port}/v1", timeout=30)
    line = str(err.value)
    assert re.match(rf"cannot connect to https://127\.0\.0\.1:{port}/v1: its TLS certificate is not trusted \(.*"
                    r"CERTIFICATE_VERIFY_FAILED.*\); check the host name in --server, or name the CA that signed it in "
                    r"SSL_CERT_FILE$", line), line
    assert "\n" not in line and "running" not in line


def test_the_model_list_failing_is_one_line():
    with FakeServer() as server:
        server.replies["/v1/models"].append(Reply.json(fixture("lmdeploy/error_flat.json"), 401))
        with pytest.raises(RemoteError, match=r"^the server answered 401 Unauthorized: Please request with valid api key!"):
            RemoteConversation.connect(server.url, api_key="wrong")
        server.replies["/v1/models"].append(Reply.json({"object": "list", "data": []}))
        with pytest.raises(RemoteError, match="serves no model"):
            RemoteConversation.connect(server.url)
        server.replies["/v1/models"].append(Reply(200, [b"<html/>"], "text/html"))
        with pytest.raises(RemoteError, match=r"not JSON \(an HTML page\); is --server the API root"):
            RemoteConversation.connect(server.url)
        web_ui = b"<!DOCTYPE html><html><head><script>boot()</script><title>Open WebUI</title></head><body></body></html>"
        server.replies["/v1/models"].append(Reply(200, [web_ui], "text/html; charset=utf-8"))
        with pytest.raises(RemoteError, match=r"^the server's answer to GET models is not JSON \(an HTML page: Open WebUI\); "
                                              r"is --server the API root \(…/v1\)\?$"):  # a web UI's port, not its API's
            RemoteConversation.connect(server.url)
        server.replies["/v1/models"].append(Reply.json(DEEP))
        with pytest.raises(RemoteError, match="not JSON; is --server the API root"):
            RemoteConversation.connect(server.url)
        server.replies["/v1/models"].append(Reply.json({"models": []}))
        with pytest.raises(RemoteError, match="no `data` array"):
            RemoteConversation.connect(server.url)


def test_a_stacked_compression_is_refused_before_it_is_inflated():
    """Two layers of gzip let a few hundred bytes inflate to gigabytes in one read (httpx inflates a
    whole network read at once); one layer is bounded by the read size and still accepted."""
    import gzip

    bomb = gzip.compress(gzip.compress(GOOD))  # small here; the shape is what matters
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply(200, [bomb], headers={"Content-Encoding": "gzip, gzip"}))
        fails_with(conv, r"^the server compressed its answer as gzip, gzip; .*check --server")
        server.chat(Reply(500, [bomb], "text/html", {"Content-Encoding": "gzip, gzip"}))
        fails_with(conv, r"compressed its answer as gzip, gzip")
        server.chat(Reply(200, [gzip.compress(GOOD)], headers={"Content-Encoding": "gzip"}))
        list(conv.ask("one layer"))
        assert conv.turns[-1].reply
        server.replies["/v1/models"].append(Reply(200, [gzip.compress(gzip.compress(fixture("vllm/models.json")))],
                                                  "application/json", {"Content-Encoding": "gzip,gzip"}))  # fmt: skip
        with pytest.raises(RemoteError, match="compressed its answer as gzip,gzip"):
            RemoteConversation.connect(server.url)
        assert "br" not in server.requests[-1].headers.get("Accept-Encoding", "")



def test_a_compressed_flood_of_events_is_decoded_only_as_far_as_the_answer_is_read(monkeypatch):
    """One network read of gzip inflates to ~1000× its size, and the SSE decoder turned all of it
    into events at once: 20 KB of `data:{}` events became a million objects (hundreds of MiB and
    seconds of work per read) before the answer loop could stop at its bound of ~1,000 events."""
    import gzip

    decoded = []

    class Counting(remote_stream.SSEDecoder):
        def feed(self, chunk: bytes) -> list:
            events = super().feed(chunk)
            decoded.append(len(events))
            return events

    monkeypatch.setattr(remote_stream, "SSEDecoder", Counting)
    flood = gzip.compress(b"data:{}\n\n" * 1_000_000)
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        decoded.clear()
        server.chat(Reply(200, [flood], headers={"Content-Encoding": "gzip"}))
        fails_with(conv, r"^the server sent far more than the 8 tokens asked for")
        assert sum(decoded) < 100_000, sum(decoded)
        server.chat(Reply(200, [gzip.compress(GOOD)], headers={"Content-Encoding": "gzip"}))
        list(conv.ask("again"))
        assert conv.turns[-1].reply

NOT_GZIP = b"not gzip at all " * 8


@pytest.mark.parametrize(
    "reply",
    [Reply(200, [NOT_GZIP], headers={"Content-Encoding": "gzip"}),
     Reply(200, [NOT_GZIP], "application/json", {"Content-Encoding": "gzip"}),
     Reply(401, [NOT_GZIP], "application/json", {"Content-Encoding": "deflate"})],
    ids=["stream", "whole-answer", "error-body"],
)  # fmt: skip
def test_a_compressed_body_that_does_not_inflate_is_one_line(reply):
    """httpx raises DecodingError, which is not a TransportError: it went past every handler (a traceback)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(reply)
        fails_with(conv, r"^the server's compressed answer does not inflate \(.*\); check --server \(or the proxy in front of it\)$")
        server.chat(Reply.sse(GOOD))
        list(conv.ask("again"))
        server.replies["/v1/models"].append(Reply(200, [NOT_GZIP], "application/json", {"Content-Encoding": "gzip"}))
        with pytest.raises(RemoteError, match=r"^the server's compressed answer does not inflate"):
            RemoteConversation.connect(server.url)

PAD = "x" * (9 << 20)  # over the 8 MiB a JSON body or one stream event may be


def test_json_over_8_mib_is_refused_before_it_is_parsed():
    """Parsed JSON takes up to ~30× its text (`[[],[],…]`), and one read of gzip inflates ~1000×: the
    64 MiB once allowed for a model list, a whole answer or one stream event let ~64 KB sent
    become ~1.5 GiB here. Real ones are kilobytes; 8 MiB is ample, and over it is one line."""
    card = {"id": "m", "owned_by": "vllm"}
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.sse(b"data: " + json.dumps({"choices": [], "pad": PAD}).encode() + b"\n\n" + GOOD))
        fails_with(conv, r"^the server sent one stream event of over 8 MiB; ")
        server.chat(Reply.json({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "pad": PAD}))
        fails_with(conv, r"^the server's answer is over 8 MiB; is --server an OpenAI-compatible server\?$")
        server.chat(Reply.sse(GOOD))
        list(conv.ask("again"))
        server.replies["/v1/models"].append(Reply.json({"data": [card], "pad": PAD}))
        with pytest.raises(RemoteError, match=r"^the server's answer to GET models is over 8 MiB; is --server right\?$"):
            RemoteConversation.connect(server.url)
        server.replies["/v1/models"].append(Reply.json({"data": [card], "pad": "x" * (7 << 20)}))
        assert RemoteConversation.connect(server.url).model == "m"

def serve_refusal(message: str) -> Reply:
    """A refusal as `internvl-chat serve` words it (serve/conversation.py, serve/errors.py)."""
    return Reply.json({"error": {"message": message, "type": "invalid_request_error", "param": "max_tokens",
                                 "code": "context_length_exceeded"}}, 400)  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (Reply.json(fixture("vllm/error_nested.json"), 400),
         "This model's maximum context length is 32768 tokens. However, you requested 33050 tokens (32026 in the "
         "messages, 1024 in the completion). Please reduce the len…"),
        (Reply.json(fixture("llamacpp/error_nested.json"), 400),
         "the request exceeds the available context size, try increasing it"),
        (serve_refusal("the conversation is 798 tokens and max_tokens is 300: together over this model's 1,024-token "
                       "context; ask for at most 226"),
         "the conversation is 798 tokens and max_tokens is 300: together over this model's 1,024-token context; ask "
         "for at most 226"),
        (serve_refusal("the conversation is at least 1,030 tokens (counted up to messages.3); this model's context "
                       "holds 1,024. Send a shorter conversation or fewer images"),
         "the conversation is at least 1,030 tokens (counted up to messages.3); this model's context holds 1,024. "
         "Send a shorter conversation or fewer images"),
        # a plain-text body (a server or proxy without OpenAI's error shape)
        (Reply(400, [b"context length exceeded: 40000 > 32768\n"], "text/plain"), "context length exceeded: 40000 > 32768"),
    ],
    ids=["vllm", "llamacpp", "serve-max-tokens", "serve-messages", "plain-text"],
)
def test_a_conversation_over_the_servers_context_says_the_servers_reason_and_how_to_make_room(reply, said):
    """The server's own words carry its counts: they are in the line, cut, without their error type;
    what to do comes last, in the app's commands (not the server's field, max_tokens)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(reply)
        line = fails_with(conv, r"^this turn and its answer do not fit the server's 32,768-token context \(the server "
                                r"said: .+\); a shorter message, /undo or /clear, or a smaller max_new_tokens$")
        assert f"(the server said: {said}); a shorter message" in line
        assert "check the message, the attachments" not in line and "invalid_request_error" not in line


def test_a_hostile_context_refusal_is_shown_escaped_on_one_short_line():
    """Line breaks, escape sequences and a flood of text in the server's message: escaped, cut."""
    message = "maximum context length is 4096 tokens\r\n\x1b[2J\x1b]0;pwned\x07\u202e" + "A" * 30_000  # under the 64 KiB of an error body read
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.json({"error": {"message": message, "code": 400}}, 400))
        line = fails_with(conv, r"^this turn and its answer do not fit the server's 32,768-token context \(the server "
                                r"said: maximum context length is 4096 tokens\\r\\n\\e\[2J\\e\]0;pwned\\x07\\u202eA+…\); ")
        assert not any(c in line for c in "\r\x1b\x07\u202e")
        assert len(line) < 400



@pytest.mark.parametrize(
    "message",
    ["the request has more than 32 images and videos; send fewer (the whole history counts)",  # internvl-chat serve
     "At most 8 image(s) may be provided in one prompt."],  # vLLM --limit-mm-per-prompt
)
def test_a_conversation_with_more_pictures_than_the_server_takes_says_what_to_do(message):
    """The limit counts the whole history, so attaching fewer to the next message is not enough."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.json({"error": {"message": message, "type": "invalid_request_error", "code": 400}}, 400))
        fails_with(conv, r"^the server answered 400 Bad Request: .*; every picture of the conversation is resent each "
                         r"turn and the server takes no more; /drop attachments, /undo or /clear$")


def test_a_request_over_the_servers_body_limit_says_the_history_counts():
    body = {"error": {"message": "the request body is over this server's 64 MiB limit; send smaller or fewer images",
                      "type": "invalid_request_error", "code": "request_too_large"}}  # internvl-chat serve
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.json(body, 413))
        fails_with(conv, r"^the server answered 413 (Request Entity|Content) Too Large: .*; the request is too large for this "
                         r"server \(every picture of the conversation is resent each turn\); /drop attachments, /undo or "
                         r"/clear, or attach smaller pictures$")


CONTEXT_400 = Reply.json(fixture("vllm/error_nested.json"), 400)
TOO_MANY_400 = Reply.json({"error": {"message": "At most 8 image(s) may be provided in one prompt.", "code": 400}}, 400)
TOO_LARGE_413 = Reply.json({"error": {"message": "the request body is over this server's 64 MiB limit"}}, 413)


@pytest.mark.parametrize(
    ("reply", "repl_hint", "oneshot_hint"),
    [
        (CONTEXT_400, " Please reduce the len…); a shorter message, or a smaller max_new_tokens",
                      " Please reduce the len…); a shorter prompt, or a smaller --max-new-tokens"),
        (TOO_MANY_400, "; the server takes no more pictures in one request; /drop attachments",
                       "; the server takes no more pictures in one request; attach fewer files"),
        (TOO_LARGE_413, "; the request is too large for this server; /drop attachments, or attach smaller pictures",
                        "; the request is too large for this server; attach fewer or smaller pictures"),
    ],
)
def test_a_first_turn_the_server_refuses_names_no_undo_or_clear_and_one_shot_names_flags(reply, repl_hint, oneshot_hint):
    """/undo and /clear free nothing before the first turn; one-shot mode has no commands at all."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = RemoteConversation.connect(server.url, params=SamplingParams(max_new_tokens=8))
        for commands, hint in ((True, repl_hint), (False, oneshot_hint)):
            conv.commands = commands
            server.chat(reply)
            with pytest.raises(RemoteError) as err:
                list(conv.ask("first"))
            assert str(err.value).endswith(hint), str(err.value)
            assert "/undo" not in str(err.value) and "/clear" not in str(err.value)
            assert conv.turns == []


NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n")
APACHE_502 = (b'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n<title>502 Proxy Error</title>\n'
              b"</head><body>\n<h1>Proxy Error</h1>\n<p>The proxy server received an invalid response</p>\n</body></html>\n")
HAPROXY_503 = (b"<html><body><h1>503 Service Unavailable</h1>\nNo server is available to handle this request.\n"
               b"</body></html>\n")  # no title: the page's text
CLOUD_504 = (b"<!DOCTYPE html><html><head><style>body { color: red }</style><script>var x = '<b>';</script>"
             b"<title>gpu.example.org | 504: Gateway time-out</title></head><body><!-- <p>x</p> -->...</body></html>")
ENVOY_503 = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (Reply(502, [NGINX_502], "text/html"),  # its title only repeats the status
         "the server (or a proxy in front of it) answered 502 Bad Gateway; check that the server is running (and that "
         "the proxy reaches it)"),
        (Reply(502, [APACHE_502], "text/html"),
         "the server (or a proxy in front of it) answered 502 Bad Gateway: Proxy Error; check that the server is running "
         "(and that the proxy reaches it)"),
        (Reply(503, [HAPROXY_503], "text/html"),
         "the server (or a proxy in front of it) answered 503 Service Unavailable: No server is available to handle this "
         "request.; check that the server is running, or try again later"),
        (Reply(504, [CLOUD_504], "text/html"),
         "the server (or a proxy in front of it) answered 504 Gateway Timeout: gpu.example.org | 504: Gateway time-out; "
         "the server did not answer the proxy in time; check that it is running, or try again"),
        (Reply(503, [ENVOY_503], "text/plain"),
         f"the server (or a proxy in front of it) answered 503 Service Unavailable: {ENVOY_503.decode()}; check that the "
         "server is running, or try again later"),
        (Reply(502, [b"Bad Gateway\n"], "text/plain; charset=utf-8"),  # Traefik
         "the server (or a proxy in front of it) answered 502 Bad Gateway; check that the server is running (and that "
         "the proxy reaches it)"),
        (Reply(502, [b"<HTML><BODY>\r\n<H1>Bad\r\n   Gateway</H1>\r\nthe   upstream\n\tis down</BODY></HTML>"], ""),  # no type
         "the server (or a proxy in front of it) answered 502 Bad Gateway: the upstream is down; check that the server is "
         "running (and that the proxy reaches it)"),
        (Reply(503, [b"<html><title>down</title></html>"], "text/html", {"Retry-After": "30"}),
         "the server (or a proxy in front of it) answered 503 Service Unavailable: down; check that the server is running, "
         "or try again later (it asks to wait 30 s)"),
        (Reply(413, [b"<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"], "text/html"),
         None),  # not a gateway status: the server's answer, its page's title without the status
    ],
    ids=["nginx", "apache", "haproxy-no-title", "cloud-504-script-style", "envoy-plain-text", "traefik-plain-text",
         "html-without-type", "retry-after", "413-nginx"],
)
def test_a_proxys_error_page_is_its_status_and_title_on_one_line(reply, line):
    """A proxy or load balancer in front of the server answers with its own page, HTML or plain text:
    the line says the status and what the page says (its title, else its text), never its markup,
    both for the chat request (streamed) and for the model list (read whole)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(reply)
        said = fails_with(conv, "")
        if line is None:  # 413
            assert re.fullmatch(r"the server answered 413 (Request Entity|Content) Too Large(: Request Entity Too Large)?; "
                                r"the request is too large .*", said), said
            return
        assert said == line
        server.replies["/v1/models"].append(reply)
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect(server.url)
        assert str(err.value) == line


def test_a_hostile_error_page_is_escaped_cut_and_read_in_one_pass():
    """Escape sequences raw or as entities, a title that never ends, a flood of `<`: one short line,
    escaped (html.unescape drops the controls written as entities), never the markup."""
    title = b"<html><head><title>\x1b[2J&#27;]0;pwned&#7;\xe2\x80\xae&lt;b&gt;" + b"x" * 60_000 + b"</title></head></html>"
    floods = [
        b"<html><title>" + b"<" * 60_000,  # a title never closed, then all markup: nothing to show
        b"<html><body>gone" + b"<title>" * 8_000,
        b"<html><body>" + b"<script>" * 8_000 + b"gone",
        b"<html><body>" + b"<!--" * 15_000,
    ]
    gateway = r"^the server \(or a proxy in front of it\) answered 502 Bad Gateway(: .*)?; check that the server is running"
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply(502, [title], "text/html"))
        line = fails_with(conv, gateway)
        assert line.startswith(r"the server (or a proxy in front of it) answered 502 Bad Gateway: \e[2J]0;pwned\u202e<b>xxx")
        assert len(line) < 300 and not any(c in line for c in "\x1b\x07\u202e")
        for page in floods:
            server.chat(Reply(502, [page], "text/html"))
            line = fails_with(conv, gateway)
            assert len(line) < 200 and "<" not in line, line


def test_error_shapes():
    assert error_text({"error": {"message": "m", "type": "t", "code": 400}}) == "m (t)"
    assert error_text({"object": "error", "message": "m", "type": "t", "code": 404}) == "m (t)"
    assert error_text({"error": "plain"}) == "plain"
    assert error_text({"error": {"code": "rate_limit"}}) == "rate_limit"
    assert error_text({"choices": []}) is None and error_text([1]) is None


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("localhost:8000", "http://localhost:8000/v1"),
        ("http://gpu:23333/", "http://gpu:23333/v1"),
        ("https://api.example.org/v1/", "https://api.example.org/v1"),
        ("http://host/proxy/openai", "http://host/proxy/openai"),
    ],
)
def test_server_urls(given, base):
    assert normalize_base_url(given) == base


@pytest.mark.parametrize("bad", ["", "ftp://host/v1", "http://", "http://host:port/v1", "http://h/v1?x=1",
                                 "http://[::1/v1", "http://h\x1b[31m/v1", "http://h\x01/v1", "http://h/\u202ev1"])
def test_bad_server_urls_are_usage_errors(bad):
    with pytest.raises(UsageError) as err:
        normalize_base_url(bad)
    assert isinstance(err.value, InternVLChatError) and err.value.exit_code == 2
    assert "\x1b" not in str(err.value) and "\u202e" not in str(err.value)


@pytest.mark.parametrize("bad", ["http://xn--/v1", "http://[::1/v1", "http://h\x01:8000/v1"])
def test_a_server_url_httpx_cannot_use_is_a_usage_error_before_anything_is_sent(bad):
    with pytest.raises(UsageError, match=r"pass --server http://HOST:PORT/v1$") as err:
        RemoteConversation.connect(bad)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_a_password_in_the_server_url_is_used_but_never_shown():
    with FakeServer(fixture("vllm/models.json")) as server:
        url = server.url.replace("http://", "http://me:s3cret@")
        conv = conversation_with_one_turn_at(server, url)
        assert server.requests[-1].headers["Authorization"].startswith("Basic ")  # httpx sends it
        assert "s3cret" not in conv.describe().where and "me@" not in conv.describe().where
    line = fails_with(conv, r"^cannot connect to http://127\.0\.0\.1:\d+/v1 ")  # the server is gone now
    assert "s3cret" not in line



@pytest.mark.parametrize("url", ["http://me:s3cret@[::1", "http://me:s3cret@\x1bhost/v1", "me:s3cret@[::1",
                                 "me:s3cret@127.0.0.1:99999"])  # fmt: skip
def test_a_password_in_a_server_url_that_is_refused_is_not_shown(url):
    # the refusal quoted the URL as typed: an unclosed [ or a control character showed the password,
    # and so did any refusal of a URL without http:// (urlsplit read the user name as its scheme)
    with pytest.raises(UsageError, match=r"pass --server http://HOST:PORT/v1$") as err:
        RemoteConversation.connect(url)
    assert "s3cret" not in str(err.value) and "me:" not in str(err.value)

def test_a_key_with_a_line_break_is_refused_before_anything_is_sent():
    with pytest.raises(UsageError, match="control characters") as err:
        RemoteConversation.connect("http://127.0.0.1:9/v1", api_key="sk\r\nX-Evil: 1")
    assert "[remote] api_key in the config file" in str(err.value)  # it may have come from there


def test_a_key_that_is_not_ascii_is_refused_as_the_key_not_the_url():
    with pytest.raises(UsageError, match="^the API key has characters that are not ASCII") as err:
        RemoteConversation.connect("http://127.0.0.1:9/v1", api_key="s3cr\u20act")
    assert "URL" not in str(err.value) and "s3cr" not in str(err.value)


def test_requests_carry_our_sampling_explicitly():
    with FakeServer(fixture("lmdeploy/models.json")) as server:
        server.chat(Reply.sse(fixture("lmdeploy/stream.sse")))
        conv = RemoteConversation.connect(server.url, params=SamplingParams(temperature=0.0, max_new_tokens=33, seed=5))
        list(conv.ask("hi"))
        body = server.chat_bodies()[0]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")} == {
        "max_tokens": 33, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "seed": 5}  # fmt: skip
    assert json.dumps(body)  # plain JSON


def model_gone(served: str) -> Reply:
    """serve's 404 for a request naming a model it does not serve (it was restarted with another)."""
    return Reply.json({"error": {"message": f"the model 'OpenGVLab/InternVL3-8B' does not exist; this server serves "
                                            f"{served!r}", "type": "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}}, 404)  # fmt: skip


def test_the_hint_for_a_model_gone_names_a_hostile_model_escaped_once():
    """The model a server listed, quoted in the hint with repr() after escaping: every backslash of
    its escapes came out doubled."""
    from internvl_chat.chat.advice import Advice
    from internvl_chat.chat.remote_errors import unknown_model_hint

    hint = unknown_model_hint("m\x1b[31mx\u202e", Advice(commands=True))
    assert "\x1b" not in hint and "\u202e" not in hint, repr(hint)
    assert "no longer serves 'm\\e[31mx\\u202e' (restarted" in hint, hint
    assert "\\\\" not in hint, hint


def test_a_server_restarted_with_another_model_says_how_to_go_on(tmp_path):
    """Every turn got a 404 that said "check --remote-model", a flag the running REPL cannot take
    (nor /set): the hint names what works, and it does: /save, restart on the model it serves, /load."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(model_gone("b"))
        line = fails_with(conv, r"^the server answered 404 Not Found: the model 'OpenGVLab/InternVL3-8B' does not exist; "
                                r"this server serves 'b' \(invalid_request_error\); ")  # fmt: skip
        assert line.endswith("; the server no longer serves 'OpenGVLab/InternVL3-8B' (restarted with another model?) "
                             "and the model cannot change here: /save, then restart internvl-chat with --remote-model "
                             "set to the model it serves, and /load the conversation")  # fmt: skip
        conv.commands = False  # one-shot: the next run's flags
        server.chat(model_gone("b"))
        assert fails_with(conv, r"404").endswith("; check --server (it usually ends in /v1) and --remote-model")

        saved = conv.save(tmp_path / "chat.json")
        server.replies["/v1/models"].append(Reply.json({"object": "list", "data": [{"id": "b", "owned_by": "vllm"}]}))
        again = RemoteConversation.connect(server.url, model="b", params=SamplingParams(max_new_tokens=8))
        again.load(saved)
        server.chat(Reply.sse(GOOD))
        list(again.ask("second"))
        body = server.chat_bodies()[-1]
        assert body["model"] == "b" and [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


def test_a_404_of_the_model_list_or_without_a_model_keeps_the_plain_hint():
    """Only a chat request's 404 that names the model is a model the server stopped serving."""
    with FakeServer() as server:
        server.replies["/v1/models"].append(Reply.json({"error": {"message": "model list not here"}}, 404))
        with pytest.raises(RemoteError, match=r"; check --server \(it usually ends in /v1\) and --remote-model$"):
            RemoteConversation.connect(server.url)
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        server.chat(Reply.json({"error": {"message": "no such route"}}, 404))
        assert fails_with(conv, r"404").endswith("; check --server (it usually ends in /v1) and --remote-model")


def test_a_server_without_vision_says_to_drop_the_pictures_not_to_try_again():
    """A llama-server started without --mmproj answers every request that holds a picture with a
    500 (fixture recorded from one); the line said "the server failed; try again", and each try (the
    picture still attached, or resent with the history) failed the same way."""
    refusal = Reply.json(fixture("llamacpp/error_no_mmproj.json"), 500)
    with FakeServer(fixture("llamacpp/models.json")) as server:
        conv = RemoteConversation.connect(server.url, params=SamplingParams(max_new_tokens=8))
        server.chat(refusal)
        with pytest.raises(RemoteError) as err:
            list(conv.ask("first"))
        assert re.fullmatch(r"the server answered 500 Internal Server Error: image input is not supported - hint: .+ "
                            r"\(server_error\); the server takes no pictures \(llama-server: start it with the model's mmproj file\); "
                            r"/drop attachments", str(err.value)), str(err.value)  # fmt: skip
        server.chat(Reply.sse(fixture("llamacpp/stream.sse")))
        list(conv.ask("first"))
        server.chat(refusal)
        line = fails_with(conv, r"; /drop attachments, and /undo or /clear turns that hold pictures \(every turn's are resent\)$")
        assert "try again" not in line
        conv.commands = False
        server.chat(refusal)
        fails_with(conv, r"; the server takes no pictures \(llama-server: start it with the model's mmproj file\); ask without --image and --video$")


def test_a_text_only_turn_over_the_servers_context_is_not_told_to_use_fewer_tiles(tmp_path):
    """llama-server -c 512 -np 2 (256 tokens a slot) refused a long text question with "request (579
    tokens) exceeds the available context size (256 tokens)"; the line's fix was "use fewer tiles or
    frames (--max-tiles, --frames)" though nothing held a picture. Only a turn with pictures says so."""
    from PIL import Image

    refusal = Reply.json({"error": {"code": 400, "message": "request (579 tokens) exceeds the available context size "
                                    "(256 tokens), try increasing it", "type": "exceed_context_size_error"}}, 400)  # fmt: skip
    models = json.loads(fixture("llamacpp/models.json"))
    models["data"][0]["meta"]["n_ctx"] = 256
    with FakeServer(json.dumps(models).encode()) as server:
        conv = RemoteConversation.connect(server.url, params=SamplingParams(max_new_tokens=8))
        conv.commands = False
        server.chat(refusal)
        with pytest.raises(RemoteError, match=r"\(256 tokens\), try increasing it\); a shorter prompt, or a smaller "
                           r"--max-new-tokens$"):  # fmt: skip
            list(conv.ask("1,2,3,4,5,6,7,8,9,0 " * 30))
        conv.commands = True
        server.chat(refusal)
        with pytest.raises(RemoteError, match=r"; a shorter message, or a smaller max_new_tokens$"):
            list(conv.ask("1,2,3,4,5,6,7,8,9,0 " * 30))
        Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
        server.chat(refusal)
        with pytest.raises(RemoteError, match=r"; use fewer or smaller pictures, or fewer frames, or a smaller "
                           r"max_new_tokens$"):  # fmt: skip
            list(conv.ask("What is it?", [conv.describe_image(tmp_path / "red.png")]))
        assert conv.turns == []


def test_a_flood_of_blank_lines_before_the_first_event_is_not_held(monkeypatch):
    """Blank lines before anything else were all kept, to see whether the body was JSON, until the
    timeout: a server sending them as fast as the network goes filled memory (300 s of loopback)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = conversation_with_one_turn(server)
        readings = itertools.count()  # the clock stands still for 60 readings (~60 pieces), then is past the bound
        monkeypatch.setattr(remote_stream, "time",
                            types.SimpleNamespace(monotonic=lambda: 0.0 if next(readings) < 60 else 1000.0))  # fmt: skip
        fed: list[int] = []
        feed = remote_stream.SSEDecoder.feed
        monkeypatch.setattr(remote_stream.SSEDecoder, "feed", lambda self, chunk: fed.append(len(chunk)) or feed(self, chunk))
        server.chat(Reply(pieces=[b"\n" * (16 << 10)], end="endless"))
        fails_with(conv, r"^the server sent no stream event for 300 s")
        assert max(fed) <= 2 * remote_stream.FEED_BYTES, fed
