"""A streamed chat completion read from a server: its chunks as parsed JSON objects, an error in
the middle of the stream (a `data: {"error": …}` event, or an `event: error`) as `StreamFailed`,
a server that ignores stream=true read as one chunk, each body read with a size and a time limit.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from ..errors import RemoteError
from ..threads import start_worker
from .advice import Advice
from .remote_errors import BROKEN, PAGE_BYTES, error_text, json_from_server, mib, page_note, shorten
from .remote_sockets import shut, shut_all
from .sse import SSEDecoder, StreamFailed

if TYPE_CHECKING:  # remote_http.py imports this module: no import cycle at run time
    from .remote_http import ApiClient


# A non-streamed answer or a model list (real ones are kilobytes). Parsed JSON takes up to ~30× its
# text, and one read of gzip inflates ~1000×: 64 MiB let ~64 KB sent become ~1.5 GiB.
JSON_BODY_LIMIT = 8 << 20
FEED_BYTES = 64 << 10  # of an event stream decoded at a time (a network read's size)
JSON_LEAD = b"\xef\xbb\xbf \t\r\n"  # what may come before a JSON body's "{" (a byte-order mark, white space)
# After `data: [DONE]` only the end of the body follows (the chunked encoding's last chunk), sent at
# once by every server we know: it is read, so that the connection goes back to the pool and the next
# turn makes no new one (a TCP and TLS handshake, one to three round trips). More than this, or not
# ended this soon: the connection is closed unread, as before.
DRAIN_BYTES = 4 << 10
DRAIN_S = 1.0


def _has_text(chunk: dict) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and isinstance(c.get("delta"), dict) and isinstance(c["delta"].get("content"), str)
        and c["delta"]["content"] != "" for c in choices
    )  # fmt: skip


class ChatStream:
    """The chunks of one streamed chat completion, as parsed JSON objects.

    Iterate it; `done` tells whether the server ended with `data: [DONE]`. `close()` (also on
    garbage collection of the generator) closes the connection, which is how servers learn that
    the client is gone and stop generating. `abort()`, from another thread, ends a read that
    waits on a server gone silent: the iteration then just stops (`aborted` is set).
    """

    def __init__(self, client: ApiClient, body: dict, advice: Advice, connect_s: float | None = None):
        self._client = client
        self._body = body
        self._advice = advice
        # the answer's deadline, when it comes before the connect timeout: a connect that takes longer
        # ends there, also where the watcher's abort cannot abandon it (no Connector in httpx's pool)
        self._connect_s = connect_s if connect_s is not None and connect_s < client.connect_s else None
        self.done = False
        self.aborted = False
        self.out_of_time = False  # the connect ended at the answer's deadline (`aborted` is set too)
        self.comments = 0  # SSE comment lines seen (keep-alive pings)
        self._lock = threading.Lock()  # `_socket` is shut only while its answer is being read
        self._socket: socket.socket | None = None
        self._started = False  # answer text received: an error after it is "in the middle of the answer"
        self._in_flight = False  # the request is being sent, or its head awaited
        self._events = self._run()

    def __iter__(self) -> Iterator[dict]:
        return self._events

    def close(self) -> None:
        self._events.close()

    def abort(self) -> None:
        """Shut the answer's socket: a read blocked in it returns at once with the end of the
        stream (a signal handler cannot do this: Python retries a read that a signal interrupted).
        Before the head has come there is no answer socket yet: the client's are shut, as HeadWatch
        does (requests run one at a time, so the others are idle), and a connect in progress is
        abandoned (Connector)."""
        with self._lock:
            self.aborted = True
            if self._socket is not None:
                shut(self._socket)
            elif self._in_flight:
                self._client.connector.abandon()
                shut_all(self._client._sockets)

    def _reading(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
            aborted = self.aborted
        if aborted:  # abort() came before there was a socket to shut
            self.abort()

    def _done_reading(self) -> None:
        with self._lock:  # before the connection may go back to the pool, where it must stay open
            self._socket = None

    def _run(self) -> Iterator[dict]:
        client = self._client
        # read by the status check, which runs as httpx's response hook
        client.advice, client.chat_model = self._advice, str(self._body.get("model", ""))
        try:
            with self._lock:
                if self.aborted:  # a cancel before the request: none is made
                    return
                self._in_flight = True
                client.connector.reset()
            with client.stream("POST", "chat/completions", json=self._body, headers={"Accept": "text/event-stream"},
                               connect_s=self._connect_s) as response:  # fmt: skip
                with self._lock:
                    self._in_flight = False
                self._reading(response)
                try:
                    yield from self._events_of(response)
                finally:
                    self._done_reading()
        except BROKEN as e:
            if isinstance(e, httpx.ConnectTimeout) and self._connect_s is not None:
                self.out_of_time = self.aborted = True  # as if the watcher had ended it at the deadline
            if self.aborted:
                return  # the shut socket, seen as a broken connection
            raise client.broken(e, self._started) from None
        finally:
            with self._lock:
                self._in_flight = False

    def _events_of(self, response: httpx.Response) -> Iterator[dict]:
        client = self._client
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":  # a server that ignores stream=true
            yield self._whole_answer(response.iter_bytes())
            self.done = True
            return
        if kind != "text/event-stream":
            page = read_limited(response, PAGE_BYTES, client.timeout) if kind in ("text/html", "") else b""
            raise RemoteError(
                f"the server answered with {shorten(kind, 60) or 'no content type'}{page_note(page, kind)}, not an event "
                "stream; is --server the API root of an OpenAI-compatible server (…/v1)?"
            )
        # the read timeout restarts with every byte: keep-alives, blank lines or a line that
        # never ends would hold the answer forever, so they count as nothing sent
        last_event = time.monotonic()
        pieces = _pieces(response.iter_bytes())
        first = _lead(pieces, client.timeout, last_event)  # its blank lines count toward that bound too
        if first.lstrip(JSON_LEAD).startswith(b"{"):  # no event starts so: JSON under the stream's type
            yield self._whole_answer(itertools.chain([first], pieces))
            self.done = True
            return
        decoder = SSEDecoder()
        start = bytearray()  # the body's start: what it is, said when it holds no event
        evented = False  # a stream event came
        for piece in itertools.chain([first], pieces):
            if len(start) < PAGE_BYTES:
                start += piece[: PAGE_BYTES - len(start)]
            events = decoder.feed(piece)
            evented = evented or bool(events)
            for event in events:
                chunk = _parse_event(event.event, event.data)
                if chunk is None:
                    self.done = True
                    self._finish_body(response, pieces)
                    return
                # a role-only first chunk is no answer yet: a break after it said "in the middle of the answer"
                self._started = self._started or _has_text(chunk)
                yield chunk
            self.comments = decoder.comments
            if events:
                last_event = time.monotonic()
            elif time.monotonic() - last_event > client.timeout:
                raise StreamFailed(
                    f"the server sent no stream event for {client.timeout:g} s (only keep-alives or an unfinished line)",
                    "it may be overloaded: try again, or raise [remote] timeout to wait longer",
                )
        if self.aborted:
            return  # a line cut short by the shut socket is no event
        finished = decoder.finish()
        if not (finished or evented) and decoder.foreign is not None:
            raise RemoteError(_not_events(bytes(start), decoder.foreign))
        for event in finished:
            chunk = _parse_event(event.event, event.data)
            if chunk is None:
                self.done = True
                return
            yield chunk

    def _finish_body(self, response: httpx.Response, rest: Iterator[bytes]) -> None:
        """After [DONE]: read the rest of the body, at most DRAIN_BYTES within DRAIN_S (its socket is
        shut then, which ends the read), so that a body that ends goes back to the pool. One that
        does not (more bytes, no end, a break, an abort) is left unread: its connection is closed."""
        headers = response.headers
        framed = "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers
        if response.http_version != "HTTP/1.1" or not framed or "close" in headers.get("connection", "").lower():
            return  # not kept for another request anyway (a body without a length ends only as its connection does)
        with self._lock:
            if self._socket is None or self.aborted:
                return  # nothing that could end a read that waits
        ended = threading.Event()

        def cut() -> None:
            if ended.wait(DRAIN_S):
                return
            with self._lock:
                # a socket shut as the body ended reads as ended in the pool, which drops it
                if not ended.is_set() and self._socket is not None:
                    shut(self._socket)

        watch = start_worker(cut, "remote-drain")
        held = 0
        try:
            for piece in rest:
                held += len(piece)
                if held > DRAIN_BYTES:
                    break
        except BROKEN:
            pass  # shut by cut(), or broken by the server: closed, and the answer is whole anyway
        finally:
            with self._lock:
                ended.set()
            watch.join()

    def _whole_answer(self, chunks: Iterator[bytes]) -> dict:
        """A body that is one JSON object: a non-streamed answer as one chunk, or the server's
        error (some servers and proxies send a streamed request's error so, even under the event
        stream's type, where it read as a stream closed early)."""
        body = read_chunks(chunks, JSON_BODY_LIMIT + 1, self._client.timeout)
        if len(body) > JSON_BODY_LIMIT:
            raise RemoteError(f"the server's answer is over {mib(JSON_BODY_LIMIT)}; is --server an OpenAI-compatible server?")
        return _whole_answer_as_chunk(body)


def _not_events(start: bytes, foreign: str) -> str:
    """For a body under the event stream's type that held no event, only lines that are not the
    format's (a proxy's HTML page, an error in plain text): it read as a stream closed early."""
    said = page_note(start, None) or f" (its first line: {shorten(foreign, 80)})"
    return (f"the server's event stream held no event{said}; is --server the API root of an OpenAI-compatible "
            "server (…/v1)?")


def _lead(pieces: Iterator[bytes], timeout: float, started: float) -> bytes:
    """The body's first pieces, up to one with more than white space (or `timeout` s of white space
    since `started`, or FEED_BYTES of it: the event loop then ends the wait, and holds none of what
    it decoded), which says whether it is JSON. A server sending blank lines as fast as the network
    goes filled memory here until the timeout; no real JSON body starts with 64 KiB of white space."""
    lead: list[bytes] = []
    held = 0
    for piece in pieces:
        lead.append(piece)
        held += len(piece)
        if piece.strip(JSON_LEAD) or held >= FEED_BYTES or time.monotonic() - started > timeout:
            break
    return b"".join(lead)


def _pieces(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body in pieces of at most FEED_BYTES: a read of gzip inflates to ~1000× its size, and all
    its events would be decoded at once, however few of them the answer loop goes on to take."""
    for chunk in chunks:
        for start in range(0, len(chunk), FEED_BYTES):
            yield chunk[start : start + FEED_BYTES]


def read_limited(response: httpx.Response, limit: int, timeout: float) -> bytes:
    """At most `limit` bytes of the body, within `timeout` s in all (a body trickled a byte at a time
    would restart the read timeout with each byte)."""
    return read_chunks(response.iter_bytes(), limit, timeout)


def read_chunks(chunks: Iterator[bytes], limit: int, timeout: float) -> bytes:
    """`read_limited` of a body whose reading has begun (httpx reads a body once)."""
    parts: list[bytes] = []
    total = 0
    started = time.monotonic()
    for raw in chunks:
        parts.append(raw)
        total += len(raw)
        if total > limit:
            break
        if time.monotonic() - started > timeout:
            raise RemoteError(
                f"the server took over {timeout:g} s to send its answer ({total:,} bytes so far); it may be overloaded: "
                "try again, or raise [remote] timeout to wait longer"
            )
    return b"".join(parts)[:limit]


def _parse_event(event: str, data: str) -> dict | None:
    """A chunk object; None for `[DONE]`; RemoteError for an error event or malformed data."""
    if data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        if event == "error":
            raise StreamFailed(f"the server stopped the answer with an error: {shorten(data)}", "ask again") from None
        raise StreamFailed(
            f"the server sent a stream event that is not JSON ({shorten(data, 80)})", "is --server an OpenAI-compatible server?"
        ) from None
    is_error = isinstance(obj, dict) and (obj.get("error") is not None or obj.get("object") == "error")
    if is_error or event == "error":
        message = error_text(obj) or data
        raise StreamFailed(f"the server stopped the answer with an error: {shorten(message)}", "ask again")
    if not isinstance(obj, dict):
        raise StreamFailed(f"the server sent a stream event that is not an object ({shorten(data, 80)})", "try --dialect generic")
    return obj


def _whole_answer_as_chunk(body: bytes) -> dict:
    """A non-streamed chat.completion turned into one stream chunk."""
    try:
        obj = json_from_server(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        raise RemoteError("the server's answer is not valid JSON; is --server an OpenAI-compatible server?") from None
    message = error_text(obj)
    if message is not None:
        raise RemoteError(f"the server answered with an error: {shorten(message)}; ask again")
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise RemoteError("the server's answer has no choices; is --server an OpenAI-compatible server?")
    choices = []
    for choice in obj["choices"]:
        if isinstance(choice, dict):
            msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            choices.append({"index": choice.get("index", 0), "delta": {"content": msg.get("content")},
                            "finish_reason": choice.get("finish_reason")})  # fmt: skip
    return {**obj, "choices": choices}
