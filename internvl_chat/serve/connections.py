"""uvicorn's HTTP/1.1 protocol (h11) with the deadlines uvicorn lacks.

uvicorn times out only a kept-alive connection that sends nothing, and any byte cancels that
timer: a client could trickle a request head forever (slow loris), keep sending the body of a
request that was already answered without reading it (a 401 or 413 comes before the body), or
stop reading its answer (a full TCP window leaves uvicorn waiting to write for ever, and a closed
connection waiting to flush is never let go). Each such connection holds a file descriptor and a
place under the connection limit, which then turns away everybody else. Three deadlines close them:

- the head: a new connection, or a kept-alive one that started its next request (pipelined
  before its answer was done, too), must send the whole request line and headers within
  `header_timeout` (more bytes do not extend it); one that sent part of a head gets a 408 first,
  an idle one is just closed;
- an unread body: once the response is out, the rest of the body must arrive within
  `body_timeout`;
- an unread answer: while bytes wait because the kernel would not take them (the client's window
  is full), the client must take some of them every `write_timeout`, else the connection is
  dropped with what it had not read. A stream's handler then sees its client gone and cancels
  the generation, which frees the engine. Nor may more than UNSENT_BYTES of them still wait at
  the end of a `write_timeout`: a non-streamed answer is written at once, and a client that took
  a few bytes of it now and then would keep all of it in memory for as long as it liked; so the
  first (size - UNSENT_BYTES) of a large answer must be read within `write_timeout` (with the
  defaults, 60 s for what is over 32 MiB), and at most UNSENT_BYTES wait for a slow reader.

An answer's bytes waiting to be sent are bounded too: a stream's writes wait for the client to take
the last one, but its job goes on meanwhile, its events waiting for the handler (serve/engine.py's
EventChannel); a client that reads a few bytes now and then, enough for the write deadline, could
have a whole long answer wait in memory (n=16 with top_logprobs=20: hundreds of MB). Once more than
UNSENT_BYTES of a stream wait (its events, about, and the unsent part of its last write) the
connection is dropped as at the write deadline, and its job cancelled (serve/replies.py asks
`unsent_over`). The protocol is found in the request's scope under CONNECTION.

A body the app reads is the app's to time (serve/app.py: 408 after `body_timeout`).

Bytes a client sends ahead while its request is answered (a pipelined request, or junk) are read
only up to PIPELINED_BYTES; the rest waits in TCP until the answer is complete (`_HeldFlow`), or
until the client has closed the connection (`_peer_closed`), whose end is then read.

The end of a client's input (a FIN) is its leaving, as in uvicorn (whose eof_received lets asyncio
close the connection): it is all the server learns when a client closes, and the app cancels a
request on it. A client that only shut its sending side (shutdown(SHUT_WR)) sends the same FIN, so
it gets no answer either. Keeping such connections open to answer them would keep every client that
left waiting for a non-streamed answer in the engine to the answer's end (nothing is written before
it, so no write would fail).

The protocol also counts the open connections for `ConnectionLimit`, which refuses a request
with an OpenAI-shaped 503 while there are too many (uvicorn's own limit answers plain text).

Both answers are made outside the app's CORS middleware: they carry its headers for a page of an
origin --allow-origin lists (serve/cors.py), so the page can read why it was refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

try:
    import fcntl
    import termios
except ImportError:  # not on Windows
    fcntl = termios = None  # type: ignore[assignment]

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from .cors import allowed_origin_headers, origin_in_partial_head
from .errors import APIError

log = logging.getLogger("internvl_chat.serve")

HEAD, DRAIN = "head", "drain"


RETRY_AFTER_S = 1  # a connection frees up when any request ends or an idle one times out

# bytes a client may send ahead (a pipelined request) while its request is answered, read and held
# by h11; past them the connection is not read until the answer is complete (TCP holds the rest)
PIPELINED_BYTES = 64 << 10

# once the shutdown's grace period is over, the seconds a client may take none of its answer (its
# write deadline), and those it has in all to take the rest while it keeps taking some; both well
# within main.py's BACKSTOP_S, after which uvicorn cancels the handlers
SHUTDOWN_WRITE_S = 1.0
SHUTDOWN_READ_S = 3.0

# bytes of a streamed answer that may wait unsent (its events not yet written, about, and what the
# kernel has not taken of its last write); past them the client is dropped as one that left
UNSENT_BYTES = 32 << 20

CONNECTION = "internvl_chat.connection"  # the scope key of the request's BoundedH11Protocol


class ConnectionLimit:
    """The ASGI app in front of ours: while more than `limit` connections are open (the one a
    request came on included), a request gets a 503 in OpenAI's error shape and its connection
    is closed.

    uvicorn's `limit_concurrency` answers a bare text/plain "Service Unavailable" that OpenAI
    clients cannot read, and has no way to change it; so the protocol below counts the
    connections (`opened`, `closed`) and this app refuses. A refused connection counts until it
    is closed, as in uvicorn.

    A connection kept alive between requests is not served: over the limit, the idle ones (those
    idle longest first) are closed to make room, as nginx reuses its idle keep-alive connections.
    A client that had sent a few requests at once (openai's pool keeps each connection open) held
    the limit for --keep-alive-timeout after their answers, and an idle server refused every other
    client meanwhile (openai's 2 retries, 1 s apart as Retry-After says, all refused).
    """

    def __init__(self, app, limit: int, origins: tuple[str, ...] = ()):
        self.app = app
        self.limit = limit
        self.origins = origins  # --allow-origin's: their pages get the CORS headers on the 503 too
        self.open: set[object] = set()  # the protocols of open connections (a set: closing twice is harmless)
        self.reclaimed: set[object] = set()  # idle ones closed to make room, open until their close is done

    def opened(self, connection: object) -> None:
        self.open.add(connection)

    def closed(self, connection: object) -> None:
        self.open.discard(connection)
        self.reclaimed.discard(connection)

    def _make_room(self) -> bool:
        """Close idle kept-alive connections, longest idle first, until those left are within the
        limit; whether they are."""
        excess = len(self.open) - len(self.reclaimed) - self.limit
        if excess <= 0:
            return True
        candidates = ((c.idle_since(), c) for c in self.open if c not in self.reclaimed)  # type: ignore[attr-defined]
        idle = sorted((pair for pair in candidates if pair[0] is not None), key=lambda pair: pair[0])
        for _, connection in idle[:excess]:
            connection.close_idle()  # type: ignore[attr-defined]
            self.reclaimed.add(connection)
        return len(self.open) - len(self.reclaimed) <= self.limit

    def hurry_readers(self) -> None:
        """The shutdown's grace period is over: each open connection whose client is not taking its
        answer is dropped (`BoundedH11Protocol.hurry_reader`)."""
        for connection in list(self.open):
            connection.hurry_reader()  # type: ignore[attr-defined]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._make_room():
            await self.app(scope, receive, send)
            return
        log.warning("refused a request: %d connections are open, over the limit of %d (--max-connections)",
                    len(self.open), self.limit)  # fmt: skip
        message = (f"too many open connections: this server serves {self.limit} at once; retry later "
                   "(its operator can raise --max-connections)")  # fmt: skip
        body = json.dumps(APIError(503, message, code="too_many_connections").body()).encode()
        origin = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"origin"), None)
        cors = [(name.lower().encode(), value.encode("latin-1"))
                for name, value in allowed_origin_headers(origin, self.origins).items()]  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close"), *cors]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


_TCP_ESTABLISHED = 1  # tcp_info's first byte, tcpi_state (Linux's include/net/tcp_states.h)


def _unread(transport) -> bool:
    """Whether the kernel holds bytes from the client (or its end) that the event loop has not read
    yet: FIONREAD where there is one (Linux, macOS); False where it cannot be told."""
    sock = transport.get_extra_info("socket")
    if sock is None or fcntl is None:
        return False
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):  # closed meanwhile (a closed socket's fileno() is -1: ValueError)
        return False


def _peer_closed(transport) -> bool:
    """Whether the client has ended its side of the connection (a FIN or a reset came), seen in
    the kernel's TCP state without reading what it sent before: Linux's TCP_INFO; False where it
    cannot be told."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
    except OSError:  # closed meanwhile
        return True


class _HeldFlow(FlowControl):
    """uvicorn's flow control, whose reading stays paused while `held()` says so."""

    def __init__(self, transport, held) -> None:
        super().__init__(transport)
        self._held = held

    def resume_reading(self) -> None:
        if not self._held():
            super().resume_reading()


def bounded_h11(header_timeout: float, body_timeout: float, limit: ConnectionLimit,
                write_timeout: float = 60.0) -> type[H11Protocol]:  # fmt: skip
    """The protocol class for uvicorn.Config(http=...), with these deadlines in seconds, counting
    its connections for `limit`."""
    attributes = {"header_timeout": header_timeout, "body_timeout": body_timeout, "write_timeout": write_timeout,
                  "connection_limit": limit}  # fmt: skip
    return type("BoundedH11Protocol", (BoundedH11Protocol,), attributes)


def _timeout_response(seconds: float, partial_head: bytes = b"", origins: tuple[str, ...] = ()) -> bytes:
    """The 408 for a head not complete after `seconds`, with the CORS headers when the Origin among
    its complete lines is one of `origins`."""
    message = (f"the request head (request line and headers) was not complete after {seconds:g} s; "
               "send it at once")  # fmt: skip
    body = json.dumps(APIError(408, message, code="request_timeout").body()).encode()
    cors = "".join(f"{name}: {value}\r\n" for name, value in
                   allowed_origin_headers(origin_in_partial_head(partial_head), origins).items())  # fmt: skip
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{cors}\r\n")  # fmt: skip
    return head.encode("latin-1") + body


def _error_response(status: int, reason: str, message: str, code: str) -> tuple[h11.Response, bytes]:
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    return h11.Response(status_code=status, headers=headers, reason=reason.encode()), body


class BoundedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    write_timeout: float = 60.0
    connection_limit: ConnectionLimit | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind: str | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes waiting when the write deadline last started
        self._hurried_until: float | None = None  # the shutdown's grace period is over (`hurry_reader`)

    # every place where the connection's state can change: a deadline starts, ends or stays
    def connection_made(self, transport) -> None:  # type: ignore[override]
        if self.connection_limit is not None:
            self.connection_limit.opened(self)
        super().connection_made(transport)
        self.flow = _HeldFlow(transport, self._holds_reading)
        # writing pauses as soon as the kernel refuses a byte (asyncio's default waits for 64 KiB
        # of our own buffer), so "paused" means exactly: the client is not taking what we send
        transport.set_write_buffer_limits(high=0)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    # bytes sent ahead while a request is answered: h11 holds them, and uvicorn pauses reading, but
    # each look for the client's disconnect (Starlette's is_disconnected, after every batch of a
    # job's events) resumed reading, so a client could push hundreds of MB into the server's
    # memory behind one long answer; past PIPELINED_BYTES reading stays paused until it is complete
    # (a request that asks to upgrade, h2c say, is in MIGHT_SWITCH_PROTOCOL, not DONE, until its
    # answer starts: a non-streamed one's only at its end)
    # A client that closes its connection meanwhile is read again, so that its end (the FIN behind
    # the bytes held) is seen and its request cancelled: a non-streamed answer, which writes nothing
    # until it is done, ran to its last token. No more can come from it: what is read is what the
    # kernel holds, bounded by its receive buffer. (Only where TCP let the FIN in: behind MBs the
    # client had still to send, it is seen when the answer is complete.)
    def _holds_reading(self) -> bool:
        return (self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL)
                and self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
                and len(self.conn.trailing_data[0]) >= PIPELINED_BYTES
                and not _peer_closed(self.transport))  # fmt: skip

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a request begun: its app runs later, from the loop
            self.cycle.scope[CONNECTION] = self  # type: ignore[literal-required]

    def unsent_over(self, queued: int) -> bool:
        """Whether `queued` bytes of an answer still to be written, with what the kernel has not
        taken of those written, are over UNSENT_BYTES; if so the connection is dropped, as a
        client that left (its stream's job is then cancelled)."""
        if self.transport is None or self.transport.is_closing():
            return False
        unsent = queued + self.transport.get_write_buffer_size()
        if unsent <= UNSENT_BYTES:
            return False
        log.info("dropping a connection from %s: %.1f MiB of its answer waited unsent, over the %.1f MiB bound",
                 self.client, unsent / (1 << 20), UNSENT_BYTES / (1 << 20))  # fmt: skip
        self.transport.abort()  # as at the write deadline: close() would wait for the unread bytes
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection_limit is not None:
            self.connection_limit.closed(self)
        self._set_deadline(None)
        self._end_write_deadline()
        super().connection_lost(exc)

    # the unread answer: from the moment bytes wait for the client until it has taken them all
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._start_write_deadline()

    def hurry_reader(self) -> None:
        """The shutdown's grace period is over: from now on the client has SHUTDOWN_WRITE_S, not
        `write_timeout`, to take some of what waits for it, and one that has taken nothing since its
        write deadline began is dropped at once; one that keeps taking some has SHUTDOWN_READ_S to
        take the rest (a large answer read at a steady pace), and is dropped at the first deadline
        past them, whatever it took (one that only trickles). A handler waiting to write to a client
        that reads nothing (a stream, a large answer) never ended: uvicorn cancelled it 5 s later,
        with a CancelledError traceback in the log. (Dropping a steady reader 1 s after the grace
        period, its answer's end 2 s off, cut it for nothing: it had till uvicorn's backstop.)"""
        self.write_timeout = min(self.write_timeout, SHUTDOWN_WRITE_S)
        if self._hurried_until is None:
            self._hurried_until = self.loop.time() + SHUTDOWN_READ_S
        if self._write_deadline is None:  # nothing waits for it (or it is closed)
            return
        self._end_write_deadline()
        if self.transport.get_write_buffer_size() < self._unsent:  # it reads: one deadline more, from now
            self._start_write_deadline()
            return
        log.info("dropping a connection from %s: the server is shutting down and it is not reading its answer",
                 self.client)  # fmt: skip
        self.transport.abort()

    def _start_write_deadline(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._write_deadline = self.loop.call_later(self.write_timeout, self._write_expired)

    def resume_writing(self) -> None:
        self._end_write_deadline()
        super().resume_writing()

    def _end_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_expired(self) -> None:
        self._write_deadline = None
        unsent = self.transport.get_write_buffer_size()
        # (the shutdown's grace period over: the process ends within seconds, memory with it; a
        # client reading a large answer fast has its SHUTDOWN_READ_S, as one reading a small one)
        if unsent > UNSENT_BYTES and self._hurried_until is None:
            # a slow reader of a large write (a non-streamed answer is written at once, tens or
            # hundreds of MB with echo and logprobs): taking a few bytes each time kept it, and
            # the whole answer in memory, for as long as it liked
            log.info("dropping a connection from %s: %.1f MiB of its answer still waited unsent after %g s "
                     "(--write-timeout), over the %.1f MiB bound", self.client, unsent / (1 << 20),
                     self.write_timeout, UNSENT_BYTES / (1 << 20))  # fmt: skip
            self.transport.abort()
            return
        if unsent < self._unsent:  # it took some: a slow reader, not a stalled one
            if self._hurried_until is None or self.loop.time() < self._hurried_until:
                self._start_write_deadline()
                return
            log.info("dropping a connection from %s: the server is shutting down and it had not taken its answer "
                     "%g s after the grace period", self.client, SHUTDOWN_READ_S)  # fmt: skip
        elif self._hurried_until is not None:
            log.info("dropping a connection from %s: the server is shutting down and it read none of its answer "
                     "for %g s", self.client, self.write_timeout)  # fmt: skip
        else:
            log.info("dropping a connection from %s: it read none of its answer for %g s (--write-timeout)",
                     self.client, self.write_timeout)  # fmt: skip
        # abort, not close: close() would wait for the unread bytes to be sent, which is what never happens
        self.transport.abort()

    def idle_since(self) -> float | None:
        """When this connection's keep-alive timeout ends, if it is idle: its last answer complete
        and sent, nothing of a next request read, nor waiting unread in its socket; None otherwise.
        (A next request the loop had not read yet, closed on as idle, made the kernel reset the
        connection: its client saw it cut mid-request.)"""
        task = self.timeout_keep_alive_task
        if task is None or self.transport is None or self.transport.is_closing() or self._wanted() is not None:
            return None
        if self.transport.get_write_buffer_size() or (self.cycle is not None and not self.cycle.response_complete):
            return None
        if _unread(self.transport):
            return None
        return task.when()

    def close_idle(self) -> None:
        """Close this idle connection now, as its keep-alive timeout would."""
        self._unset_keepalive_if_required()
        super().timeout_keep_alive_handler()

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn starts its keep-alive timer when a response completes, and only bytes received
        # after that stop it: the next head of a client that pipelines, read while the answer was
        # still going, was closed as idle without a word. A head that has begun has its own deadline.
        if self._wanted() == HEAD:
            return
        super().timeout_keep_alive_handler()

    def _should_upgrade(self) -> bool:
        """Never: the API has no WebSocket endpoint and speaks HTTP/1.1 only. A request that asks to
        upgrade (curl's h2c, a WebSocket) is answered over HTTP/1.1, as HTTP lets a server
        do, without uvicorn's two warnings per request, any client's to send, the second telling
        the operator to install a WebSocket library (which would change nothing here)."""
        return False

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (not HTTP/1.1, a bad length, a head over the size limit):
        uvicorn answers it in text/plain, which OpenAI clients cannot read; this is its JSON."""
        limit = self.config.h11_max_incomplete_event_size or 16 << 10  # h11's default
        if len(self.conn.trailing_data[0]) > limit:
            message = (f"the request line and headers are over this server's {limit >> 10} KiB limit; "
                       "send shorter headers")  # fmt: skip
        else:
            message = ("the request is not valid HTTP/1.1 (its request line, a header or its length is malformed); "
                       "send a well-formed request, to an http:// URL (this server does not speak TLS)")  # fmt: skip
        response, body = _error_response(400, "Bad Request", message, "invalid_http_request")
        try:
            self.transport.write(self.conn.send(response) + self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be said
            pass
        self.transport.close()

    def _wanted(self) -> str | None:
        if self.transport is None or self.transport.is_closing():
            return None
        theirs = self.conn.their_state
        if theirs is h11.IDLE:
            # a new connection, or bytes of the next request on a kept-alive one (with none,
            # uvicorn's keep-alive timeout applies)
            started = self.cycle is None or bool(self.conn.trailing_data[0])
            return HEAD if started else None
        if theirs is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
            return DRAIN  # answered; the rest of the body is read only to be dropped
        return None  # the app has the request

    def _watch(self) -> None:
        kind = self._wanted()
        if kind != self._deadline_kind:  # the same phase keeps its deadline: trickling does not extend it
            self._set_deadline(kind)

    def _set_deadline(self, kind: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_kind = None, kind
        if kind is not None:
            seconds = self.header_timeout if kind == HEAD else self.body_timeout
            self._deadline = self.loop.call_later(seconds, self._expired, kind)

    def _expired(self, kind: str) -> None:
        self._deadline = None
        if self._wanted() != kind:  # the state changed since (the server's shutdown closed it)
            self._deadline_kind = None
            self._watch()
            return
        if kind == HEAD and self.conn.trailing_data[0]:
            origins = self.connection_limit.origins if self.connection_limit is not None else ()
            self.transport.write(_timeout_response(self.header_timeout, bytes(self.conn.trailing_data[0]), origins))
        log.debug("closing a connection from %s: its request %s did not arrive in time", self.client,
                  "head" if kind == HEAD else "body")  # fmt: skip
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()
