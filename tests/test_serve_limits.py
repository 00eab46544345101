"""`internvl-chat serve` against slow and abusive clients, over real sockets.

One server with small limits (2 connections, 2 s deadlines, 4 KiB heads) and small socket send
buffers (a client that stops reading stalls it soon) serves the module.
Each test waits for an outcome (a response, the server closing the socket, uvicorn's set of
open connections) with a generous bound; none measures how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import threading
import time

import httpx
import pytest

from internvl_chat.serve import connections, engine
from internvl_chat.serve.logprobs import entries_bytes
from serve_support import RunningServer

WAIT_S = 60
# A short keep-alive would close a kept-alive connection before a busy test could send its next
# request (a test of the head deadline would then see no 408); the one test that needs a short
# keep-alive sets it for its own connection.
LIMITS = {"max_connections": 2, "header_timeout": 2.0, "body_timeout": 2.0, "write_timeout": 2.0,
          "keep_alive_timeout": 30.0, "max_header_kb": 4}  # fmt: skip
SMALL_BUFFER = 4096  # bytes; the kernel doubles it


@pytest.fixture(scope="module")
def server(tiny_original):
    with RunningServer(tiny_original, **LIMITS) as running:
        # accepted connections inherit the listener's send buffer (and no autotuning to megabytes)
        running.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        yield running


@pytest.fixture(autouse=True)
def no_connections_left(server):
    """Every test starts with no connection open and leaves none (the limit counts them all)."""
    _wait_until(lambda: not server.server.server_state.connections, "the last test's connections closed")
    yield
    server.worker.on_start = None


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)


def _connect_unread(server) -> socket.socket:
    """A client with a small receive window, for tests where it never reads: its window fills soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # before connect: it sets the window
    sock.settimeout(WAIT_S)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _read_to_close(sock: socket.socket, keep_sending: bytes = b"") -> bytes:
    """Everything the server sends until it closes the connection; meanwhile one byte of
    `keep_sending` goes out every 0.1 s, as a slow-loris client trickles its request."""
    received, pending = b"", keep_sending
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                block = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not block:
                return received
            received += block
        elif pending:
            try:
                sock.sendall(pending[:1])
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed meanwhile: the next recv says so
            pending = pending[1:]
    raise AssertionError(f"the server kept the connection open; it sent {received!r}")


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _chat(text: str, **kw) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2, **kw}).encode()


def _head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


def _record_jobs(server) -> list:
    jobs: list = []
    server.worker.on_start = jobs.append
    return jobs


def _normal_answer(server) -> None:
    with server.client() as client:  # closed after: its kept-alive connection would count
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert out.choices[0].message.content is not None


# ---- the body -------------------------------------------------------------------------------------


def test_a_client_that_stalls_mid_body_gets_408_and_is_closed(server):
    jobs = _record_jobs(server)
    body = _chat("Describe the harbour.")
    with _connect(server) as sock:
        sock.sendall(_head("/v1/chat/completions", len(body)) + body[: len(body) // 2])
        status, headers, answer = _response(_read_to_close(sock))
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(answer)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert "2 s" in error["message"] and "body" in error["message"]
    assert jobs == []  # the engine never saw it
    _normal_answer(server)
    assert len(jobs) == 1


def test_a_body_trickled_past_the_deadline_gets_408(server):
    """More bytes do not extend the deadline: it bounds the whole body."""
    jobs = _record_jobs(server)
    body = _chat("x" * 2000)
    with _connect(server) as sock:
        sock.sendall(_head("/v1/chat/completions", len(body)))
        status, _, answer = _response(_read_to_close(sock, keep_sending=body))
    assert status == 408 and json.loads(answer)["error"]["code"] == "request_timeout"
    assert jobs == []


def test_the_unread_body_of_an_answered_request_cannot_hold_the_connection(server):
    """A 401 (or 413) is sent before the body is read; a client that then keeps trickling the
    body used to keep its connection for ever (every byte restarted uvicorn's keep-alive timer)."""
    server.options.api_key = "s3cret"
    try:
        with _connect(server) as sock:
            sock.sendall(_head("/v1/chat/completions", 100_000) + b'{"model": "tiny"')
            raw = _read_to_close(sock, keep_sending=b" " * 5000)
    finally:
        server.options.api_key = ""
    assert _response(raw)[0] == 401
    _normal_answer(server)


# ---- the answer -----------------------------------------------------------------------------------


def _an_unread_stream_is_dropped(server, failure: str) -> None:
    """A stream whose client never reads, its answer's text coming until its job is cancelled: the
    job is cancelled, the engine freed, the connection closed and no longer counted under the
    connection limit; the next request is served. `failure`: what it means if the job runs on."""
    worker, first, seen = server.worker, threading.Event(), {}

    def long_answer(job, event) -> None:  # text keeps coming, as from a long answer, until cancelled
        if first.is_set():
            return
        seen["job"] = job
        first.set()
        for _ in range(WAIT_S * 100):
            if job.cancel.wait(0.01):
                break
            job.emit("text", "x" * 16384)

    worker.on_event = long_answer
    try:
        with _connect_unread(server) as sock:
            body = _chat("Write a long story.", stream=True, max_tokens=8)
            sock.sendall(_head("/v1/chat/completions", len(body)) + body)
            assert first.wait(WAIT_S)
            assert seen["job"].cancel.wait(WAIT_S), failure
            assert worker.wait_idle(WAIT_S)
            _wait_until(lambda: not server.server.server_state.connections, "the unread connection dropped")
    finally:
        worker.on_event = None
    record = next(r for r in worker.finished if r["job"] == seen["job"].number)
    assert record["finish_reason"] == "cancelled"
    assert not server.server.config.app.open  # nor does it count under the connection limit any more
    _normal_answer(server)  # the next request is served


def test_a_stream_its_client_stops_reading_is_dropped_and_the_engine_freed(server):
    """A client that opens a stream and never reads: its window fills, the server's writes wait.
    They used to wait for ever, and the generation ran on to max_tokens for nobody (on a big
    model, minutes to hours of the one engine); now the client is dropped after --write-timeout
    and its generation cancelled."""
    _an_unread_stream_is_dropped(server, "the server kept waiting for a client that does not read")


def test_a_stream_whose_unsent_answer_passes_the_bound_is_dropped_and_its_job_cancelled(server, monkeypatch, caplog):
    """A client that reads a few bytes now and then keeps --write-timeout from dropping it, while
    its answer waits in the server's memory (a stream's writes wait for it; the job goes on): with
    n=16 and top_logprobs=20, hundreds of MB. Past UNSENT_BYTES waiting it is dropped as a client
    that left. Here the write deadline is out of reach and the bound small: a client that never
    reads passes the bound, and nothing else drops it."""
    monkeypatch.setattr(connections, "UNSENT_BYTES", 256 << 10)
    monkeypatch.setattr(server.server.config.http_protocol_class, "write_timeout", 3600.0)
    caplog.set_level(logging.INFO, logger="internvl_chat.serve")
    _an_unread_stream_is_dropped(server, "the answer waited unsent without bound")
    assert any("waited unsent, over the 0.2 MiB bound" in r.getMessage() for r in caplog.records)


def test_a_jobs_channel_counts_the_events_waiting_until_its_handler_takes_them():
    """What the bound above reads (`EventChannel.queued`): the events waiting for the handler, text
    by its length and its logprob entries as `entries_bytes`, heard by `watch` at each
    wake-up, and back to 0 each time the handler takes them: a client that keeps up is never
    counted for the answer it has already been given (the test above cannot see a count that
    only grows)."""
    alternative = {"token": "b", "logprob": -1.0, "bytes": [98]}
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [alternative] * 2}

    async def run() -> tuple[list[int], list[int]]:
        channel = engine.EventChannel(asyncio.get_running_loop())
        heard: list[int] = []
        counts: list[int] = []
        channel.watch = heard.append
        for _ in range(3):  # three rounds: each taken whole before the next
            channel.put(("text", "abcd"))
            channel.put(("tokens", ("xy", [entry])))
            channel.put(("choice", {"index": 0}))  # an answer's end, counted in its deltas
            while len(heard) < len(counts) // 2 + 1:  # the first put's wake-up (the others wait on it)
                await asyncio.sleep(engine.COALESCE_S)
            counts.append(channel.queued)
            assert len(await channel.get_batch(WAIT_S)) == 3
            counts.append(channel.queued)
        return heard, counts

    heard, counts = asyncio.run(run())
    one = 4 + 2 + entries_bytes([entry])
    assert counts == [one, 0] * 3
    assert heard == [one] * 3


def test_waiting_logprob_entries_are_counted_as_the_memory_they_take(tiny_tokenizer):
    """The count the bound above reads, for events with logprobs: real entries (TokenPieces') as
    they wait, against the memory they were measured to take. Each entry and alternative was
    counted as 512 bytes, about twice what one takes (and 7-8 times its JSON), so a slow reader
    with logprobs was dropped with far less than UNSENT_BYTES of its answer waiting."""
    import tracemalloc

    from internvl_chat.chat.sampling import TokenLogprob
    from internvl_chat.engine.tokenizer import load_tokenizer
    from internvl_chat.serve.logprobs import TokenPieces

    pieces = TokenPieces(load_tokenizer(tiny_tokenizer))
    ids = pieces.tokenizer.encode("The harbour at dawn: boats, gulls, nets and rope; été € 42.")
    for top in (0, 5, 20):
        tokens = [TokenLogprob(token_id, -0.25 - k / 7, tuple((ids[(k + j) % len(ids)], -1.5 - j / 3) for j in range(top)))
                  for k, token_id in enumerate(ids * 20)]  # fmt: skip
        for token_id in ids:  # the pieces' cache filled first, as in a server that has run a while
            pieces.piece(token_id)
        tracemalloc.start()
        try:
            entries = [pieces.content(token) for token in tokens]
            taken, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        counted = engine.event_bytes(("tokens", ("", entries)))
        assert 0.8 < counted / taken < 1.25, (top, counted, taken)


def test_an_answer_its_client_does_not_read_cannot_hold_the_connection(server):
    """A non-streaming answer is written after the engine is done; a client that never reads it
    used to keep its connection (and a place under the limit) for ever, the answer waiting in
    the server's buffer."""
    worker, jobs = server.worker, _record_jobs(server)

    def big_answer(job, event) -> None:
        event["text"] = "y" * (1 << 20)  # far more than the socket buffers hold

    worker.on_event = big_answer
    try:
        with _connect_unread(server) as sock:
            body = _chat("Describe the harbour.")
            sock.sendall(_head("/v1/chat/completions", len(body)) + body)
            _wait_until(lambda: len(jobs) == 1, "the request reached the engine")
            assert worker.wait_idle(WAIT_S)  # the engine was done before the answer was written
            _wait_until(lambda: not server.server.server_state.connections, "the unread connection dropped")
    finally:
        worker.on_event = None
    assert not server.server.config.app.open
    _normal_answer(server)


def test_a_slow_reader_of_a_large_answer_is_dropped_once_more_than_the_bound_waits(server, monkeypatch, caplog):
    """A non-streaming answer is written at once; a client that reads a few KB now and then (enough
    for --write-timeout, which drops only a client that reads nothing) kept the whole answer in the
    server's memory for as long as it liked (with echo and logprobs, hundreds of MB). Past
    UNSENT_BYTES still waiting when a write_timeout ends, it is dropped. The client reads slowly on,
    until the server closes the connection or it has the whole answer (the failure)."""
    monkeypatch.setattr(connections, "UNSENT_BYTES", 256 << 10)
    caplog.set_level(logging.INFO, logger="internvl_chat.serve")
    worker, size = server.worker, 1 << 20

    def big_answer(job, event) -> None:
        event["text"] = "y" * size

    worker.on_event = big_answer
    received = b""
    try:
        with _connect_unread(server) as sock:
            body = _chat("Describe the harbour.")
            sock.sendall(_head("/v1/chat/completions", len(body)) + body)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and received.count(b"y") < size:
                time.sleep(0.1)  # 4 KiB a tenth of a second: slow, never stalled
                try:
                    block = sock.recv(4096)
                except ConnectionResetError:
                    break
                if not block:
                    break
                received += block
    finally:
        worker.on_event = None
    assert received.count(b"y") < size, "the slow reader was given its whole answer: nothing bounded what waited"
    assert any("still waited unsent" in r.getMessage() for r in caplog.records)
    _wait_until(lambda: not server.server.server_state.connections, "the slow reader's connection dropped")
    _normal_answer(server)


# ---- the head -------------------------------------------------------------------------------------


def test_a_trickled_head_gets_408_and_is_closed(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n")
        raw = _read_to_close(sock, keep_sending=b"X-Slow: " + b"a" * 2000)
    status, headers, answer = _response(raw)
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(answer)["error"]
    assert error["code"] == "request_timeout" and "head" in error["message"]
    _normal_answer(server)


def test_a_connection_that_sends_nothing_is_closed(server):
    with _connect(server) as sock:
        assert _read_to_close(sock) == b""  # closed without a response: there was no request


def test_a_kept_alive_connection_must_send_its_next_head_in_time(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while b'{"status":"ok"}' not in first:
            block = sock.recv(4096)
            assert block, first
            first += block
        assert _response(first)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request starts, and stalls
        status, _, answer = _response(_read_to_close(sock, keep_sending=b"X-Slow: " + b"a" * 2000))
    assert status == 408 and json.loads(answer)["error"]["code"] == "request_timeout"


def test_a_pipelined_head_that_stalls_gets_408_not_the_keep_alive_close(server):
    """A client that pipelines sends the start of its next request with the first one. Those bytes
    were read before the answer was done, so none came after uvicorn started its keep-alive timer;
    the connection was taken for idle and closed without a word at --keep-alive-timeout (here
    shorter than the head's deadline) instead of getting the head's 408."""
    server.server.config.timeout_keep_alive = 0.2  # each new connection takes it from the config
    try:
        with _connect(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n" + b"GET /health HTTP/1.1\r\n")
            raw = _read_to_close(sock)
    finally:
        server.server.config.timeout_keep_alive = LIMITS["keep_alive_timeout"]
    responses = [b"HTTP/1.1 " + r for r in raw.split(b"HTTP/1.1 ")[1:]]
    assert [_response(r)[0] for r in responses] == [200, 408], raw
    assert json.loads(_response(responses[1])[2])["error"]["code"] == "request_timeout"


def test_a_head_over_the_size_limit_is_refused(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 5000)  # 4 KiB limit, not complete
        status, headers, _ = _response(_read_to_close(sock))
    assert status == 400 and headers["connection"] == "close"  # what uvicorn answers when h11 gives up


# ---- the connection limit ---------------------------------------------------------------------------


def test_past_the_connection_limit_a_request_gets_a_json_503_and_the_limit_frees_up(server):
    """Two connections are served at once: a stream held in the engine and one queued behind it
    (streams keep their connection for the whole answer); a third gets 503 in OpenAI's error shape
    (uvicorn's own limit answered text/plain "Service Unavailable", which clients cannot read)."""
    import openai

    started, release = threading.Event(), threading.Event()

    def hold(job) -> None:
        if not started.is_set():
            started.set()
            assert release.wait(WAIT_S)

    server.worker.on_start = hold
    outcomes: dict[str, int] = {}

    def ask(name: str) -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", content=_chat(name, stream=True),
                          headers={"content-type": "application/json"}, timeout=WAIT_S) as r:  # fmt: skip
            r.read()
            outcomes[name] = r.status_code

    first, second = threading.Thread(target=ask, args=("first",)), threading.Thread(target=ask, args=("second",))
    try:
        first.start()
        assert started.wait(WAIT_S)
        second.start()
        _wait_until(lambda: server.worker.waiting == 1, "the second request waits in the queue")
        with server.client() as client, pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "third"}], max_tokens=2)
        with _connect(server) as sock:  # the same refusal as bytes: one JSON error, then the connection closes
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            status, headers, body = _response(_read_to_close(sock))
    finally:
        release.set()
        first.join(WAIT_S)
        second.join(WAIT_S)
    err = refused.value
    assert err.status_code == 503 and err.code == "too_many_connections" and err.type == "server_error"
    assert "serves 2 at once; retry later" in err.message and "--max-connections" in err.message
    assert err.response.headers["connection"] == "close" and err.response.headers["retry-after"] == "1"
    assert status == 503 and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body) == {"error": err.body}  # what the client parsed
    assert outcomes == {"first": 200, "second": 200}
    _wait_until(lambda: not server.server.server_state.connections, "the streams' connections closed")
    assert not server.server.config.app.open  # the limit's count of open connections is back to none
    _normal_answer(server)


# ---- options ------------------------------------------------------------------------------------------



def test_connections_kept_alive_between_requests_make_room_for_another_client(server):
    """Connections idle between requests (openai's pool keeps each one open) held the limit for
    --keep-alive-timeout after their answers: an idle server refused other clients meanwhile (a
    503, and again at each of openai's retries). The one idle longest is closed for a new request."""
    import openai

    limit = server.server.config.app
    first, second, third = (server.client() for _ in range(3))
    try:
        for client in (first, second):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert len(limit.open) == 2  # both kept alive, idle: the limit is reached
        answer = third.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")
        _wait_until(lambda: len(limit.open) == 2, "the connection idle longest closed")
        # asyncio closes its socket after connection_lost, in the same callback: once a turn of the loop
        # has run since, the client sees the close before it asks again (not a reset mid-request)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), next(iter(limit.open)).loop).result(WAIT_S)
        # its client opens another when it asks again, and the next idle one makes room for it
        again = first.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert again.choices[0].finish_reason in ("stop", "length")
    except openai.APIStatusError as err:
        raise AssertionError(f"refused: {err.status_code} {err.message}") from None
    finally:
        for client in (first, second, third):
            client.close()
    _wait_until(lambda: not limit.open and not limit.reclaimed, "the limit's counts back to none")

def test_a_kept_alive_connection_whose_next_request_is_unread_is_not_closed_to_make_room(server):
    """A connection looked idle to uvicorn while its client's next request sat in the server's socket,
    not yet read by the event loop (a request on another connection was handled first in the same
    turn of the loop): it was closed to make room, the kernel answered the unread bytes with a reset,
    and its client saw the connection reset mid-request (a POST that no client may safely resend).
    A connection with bytes waiting unread is not idle."""
    limit = server.server.config.app
    ask = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"

    def answered(sock: socket.socket) -> int:
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
                raw.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0] or 0):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        return int(raw.split(b" ", 2)[1]) if raw else 0

    first, second = _connect(server), _connect(server)
    try:
        for sock in (first, second):
            sock.sendall(ask)
            assert answered(sock) == 200
        _wait_until(lambda: len(limit.open) == 2 and all(c.idle_since() is not None for c in limit.open),
                    "both connections kept alive, idle")  # fmt: skip
        with _connect(server):  # one more: over the limit, as a new client's request would find it
            _wait_until(lambda: len(limit.open) == 3, "the third connection counted")
            loop = next(iter(limit.open)).loop

            port = first.getsockname()[1]
            (first_served,) = (c for c in limit.open if c.client and c.client[1] == port)

            async def next_request_then_room() -> bool:
                first.sendall(ask)  # in the server's socket; the loop, running this, has not read it
                deadline = time.monotonic() + WAIT_S  # on loopback it is there at once; a busy machine may lag
                while not connections._unread(first_served.transport) and time.monotonic() < deadline:
                    time.sleep(0.01)  # blocking the loop: it must not read the request meanwhile
                return limit._make_room()

            asyncio.run_coroutine_threadsafe(next_request_then_room(), loop).result(WAIT_S)
            try:
                status = answered(first)
            except ConnectionResetError:
                status = "reset"
            assert status == 200
    finally:
        first.close()
        second.close()


def test_the_limits_are_serve_flags_with_defaults():
    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.serve.options import ServeOptions
    from internvl_chat.settings import load_settings

    defaults = ServeOptions.from_settings(load_settings(os.devnull, {}, {}))
    assert (defaults.max_connections, defaults.header_timeout, defaults.body_timeout, defaults.write_timeout,
            defaults.keep_alive_timeout, defaults.max_header_bytes) == (100, 10.0, 60.0, 60.0, 5.0, 16 << 10)  # fmt: skip
    args = build_parser().parse_args(["--max-connections", "7", "--header-timeout", "1.5", "--body-timeout", "30",
                                      "--write-timeout", "45", "--keep-alive-timeout", "0.5",
                                      "--max-header-kb", "8"])  # fmt: skip
    options = ServeOptions.from_settings(load_settings(os.devnull, {}, _overrides(args)))
    assert (options.max_connections, options.header_timeout, options.body_timeout, options.write_timeout,
            options.keep_alive_timeout, options.max_header_bytes) == (7, 1.5, 30.0, 45.0, 0.5, 8 << 10)  # fmt: skip
    env = {"INTERNVL_CHAT_SERVE_BODY_TIMEOUT": "12.5", "INTERNVL_CHAT_SERVE_WRITE_TIMEOUT": "20"}
    from_env = load_settings(os.devnull, env, {}).serve
    assert (from_env.body_timeout, from_env.write_timeout) == (12.5, 20.0)


def test_the_video_decoding_limit_is_a_flag_and_a_setting_in_megapixels():
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.serve.options import ServeOptions
    from internvl_chat.settings import load_settings

    def limit(argv: list[str], env: dict | None = None) -> int | None:
        settings = load_settings(os.devnull, env or {}, _overrides(build_parser().parse_args(argv)))
        return ServeOptions.from_settings(settings).max_video_decode_pixels

    assert limit([]) == ServeOptions().max_video_decode_pixels == 20_000_000_000  # about 5 minutes of 1080p at 30 fps
    assert limit(["--max-video-decode-megapixels", "5"]) == 5_000_000
    assert limit(["--max-video-decode-megapixels", "0"]) is None  # no limit
    assert limit([], {"INTERNVL_CHAT_SERVE_MAX_VIDEO_DECODE_MEGAPIXELS": "7"}) == 7_000_000
    with pytest.raises(UsageError) as err:
        limit(["--max-video-decode-megapixels", "-1"])
    assert "must be an integer ≥ 0" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("max_connections", 0, "an integer from 1 to 65535"),
    ("max_connections", 2.5, "an integer from 1 to 65535"),
    ("header_timeout", 0, "a number of seconds > 0 and ≤ 3600"),
    ("body_timeout", -1, "a number of seconds > 0 and ≤ 3600"),
    ("body_timeout", float("inf"), "a number of seconds > 0 and ≤ 3600"),
    ("write_timeout", 0, "a number of seconds > 0 and ≤ 3600"),
    ("keep_alive_timeout", 7200, "a number of seconds > 0 and ≤ 3600"),
    ("keep_alive_timeout", "soon", "a number of seconds > 0 and ≤ 3600"),
    ("max_header_kb", 0, "an integer from 1 to 1024"),
    ("max_header_kb", 2048, "an integer from 1 to 1024"),
])  # fmt: skip
def test_bad_limits_are_one_line_errors(key, value, expect):
    from internvl_chat.errors import UsageError
    from internvl_chat.settings import load_settings

    with pytest.raises(UsageError) as err:
        load_settings(os.devnull, {}, {f"serve.{key}": value})
    assert str(err.value).startswith(f"flag serve.{key}: must be {expect}") and "\n" not in str(err.value)  # the key once


def test_uvicorn_gets_the_limits():
    """The connection limit is ours (uvicorn's limit_concurrency answers text/plain): the app
    uvicorn runs is the limit in front of ours, and the protocol counts connections for it."""
    from internvl_chat.serve.connections import ConnectionLimit
    from internvl_chat.serve.main import uvicorn_config
    from internvl_chat.serve.options import ServeOptions

    options = ServeOptions(max_connections=7, header_timeout=3.0, body_timeout=4.0, write_timeout=6.0,
                           keep_alive_timeout=0.5, max_header_bytes=8192)  # fmt: skip
    app = object()
    config = uvicorn_config(app, options, "warning")
    assert (config.limit_concurrency, config.timeout_keep_alive, config.h11_max_incomplete_event_size) == (None, 0.5, 8192)
    assert isinstance(config.app, ConnectionLimit) and (config.app.app, config.app.limit) == (app, 7)
    assert config.http.connection_limit is config.app and config.ws == "none"
    assert (config.http.header_timeout, config.http.body_timeout, config.http.write_timeout) == (3.0, 4.0, 6.0)
