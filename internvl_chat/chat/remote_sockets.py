"""The client's sockets under control from other threads: shut to end a read blocked in them
(`shut`, `shut_all`; `HeadWatch`, when an answer's head does not come in time), and connects made
in a worker thread (`Connector`), so that a cancel or a deadline can abandon one still being made.
"""

from __future__ import annotations

import re
import socket
import threading
import weakref

import httpcore
import httpx

from ..threads import start_worker


def shut(sock: socket.socket) -> None:
    """End every read blocked in `sock` at once (the plain socket's shutdown: an SSLSocket's own
    would unwrap it under the read)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed (by either side)


def shut_all(sockets: weakref.WeakSet[socket.socket]) -> None:
    """`shut` each of a client's sockets, from a watcher thread: the thread making requests may
    add one meanwhile, which ends an iteration of the set with a RuntimeError; it is read again."""
    for _ in range(100):
        try:
            current = list(sockets)
        except RuntimeError:  # "Set changed size during iteration"
            continue
        for sock in current:
            shut(sock)
        return


class HeadWatch:
    """Shuts the client's sockets when the head of an answer has not come `timeout` s after the
    request was sent. The read timeout restarts with every byte, so a head trickled a byte at a
    time, or `100 Continue` heads without end, would hold a request (a one-shot run) forever."""

    def __init__(self, sockets: weakref.WeakSet[socket.socket], timeout: float):
        self._sockets = sockets
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.fired = False
        start_worker(lambda: self._watch(timeout), "remote-head")

    def _watch(self, timeout: float) -> None:
        if self._done.wait(timeout):
            return
        with self._lock:  # a head that arrived meanwhile wins
            if self._done.is_set():
                return
            self.fired = True
            # requests run one at a time: the others are idle, and the pool drops an idle
            # connection whose socket reads as ended
            shut_all(self._sockets)

    def stop(self) -> None:
        with self._lock:
            self._done.set()


class _Attempt:
    """One connect made in a worker thread, for a requester that may stop waiting for it."""

    def __init__(self) -> None:
        self.settled = threading.Event()  # made, failed, or given up on
        self._lock = threading.Lock()
        self._stream: httpcore.NetworkStream | None = None
        self._error: BaseException | None = None
        self._given_up = False

    def run(self, connect) -> None:
        stream = error = None
        try:
            stream = connect()
        except BaseException as e:  # noqa: BLE001 - handed to the requester, raised there
            error = e
        with self._lock:
            self._stream, self._error = stream, error
            given_up = self._given_up
        if given_up and stream is not None:  # nobody takes it
            stream.close()
        self.settled.set()

    def outcome(self) -> httpcore.NetworkStream:
        if self._error is not None:
            raise self._error
        return self._stream  # type: ignore[return-value]

    def give_up(self) -> None:
        """The connection is closed now if it was made, else by the worker once it is."""
        with self._lock:
            self._given_up = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


# How an HTTP request's head starts (one write, httpcore's): an answer to it must start "HTTP/"
HTTP_REQUEST = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
STATUS_START = b"HTTP/"  # how every HTTP/1 status line starts (h11 takes no other)


class NotHttpAnswer(httpcore.RemoteProtocolError):
    """What answered an HTTP request does not start with "HTTP/": another protocol at the port
    (an SSH server's banner, a TLS alert). `began`: the first bytes it sent; `to_proxy`: the request
    was one for an HTTP proxy (CONNECT, or a full URL as its target), which answered so."""

    def __init__(self, began: bytes, to_proxy: bool = False):
        super().__init__("it does not answer with HTTP")
        self.began = began
        self.to_proxy = to_proxy


class HttpAnswerCheck(httpcore.NetworkStream):
    """A connection whose first answer is checked as its first bytes come: h11 waits for a whole
    head (an empty line), which a server speaking another protocol may never send, and SSH's
    server sends its banner line and waits (the request then ended at the head's timeout, as
    if the server were busy). Only after a request has been written: a SOCKS proxy's handshake,
    made on the same connection before it, is binary."""

    def __init__(self, stream: httpcore.NetworkStream, connector: Connector | None = None):
        self._stream = stream
        self._connector = connector  # told of every byte that comes (`Connector.heard`)
        self._expecting = False  # an HTTP request went out, its answer's start not yet seen whole
        self._start = b""  # the answer's first bytes so far (up to len(STATUS_START))
        self._checked = False  # one answer started right: the connection speaks HTTP
        self._to_proxy = False  # the request awaiting that answer was an HTTP proxy's

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        request = None if self._checked else HTTP_REQUEST.match(buffer)
        if request is not None:
            self._expecting = True
            # a server is asked for a path ("/v1/models"); a proxy to CONNECT, or for a whole URL
            self._to_proxy = request.group(1) == b"CONNECT" or not request.group(2).startswith(b"/")
        self._stream.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._stream.read(max_bytes, timeout)
        if data and self._connector is not None:
            self._connector.heard = True
        if self._expecting and data:
            began = self._start + data  # the earlier reads' bytes too: all of them are in _start
            self._start += data[: len(STATUS_START) - len(self._start)]
            if not STATUS_START.startswith(self._start):
                raise NotHttpAnswer(began, self._to_proxy)
            self._checked = len(self._start) == len(STATUS_START)
            self._expecting = not self._checked
        return data

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        # a new layer: what answers through it (the server behind an HTTP proxy's tunnel) is checked anew
        return HttpAnswerCheck(self._stream.start_tls(ssl_context, server_hostname, timeout), self._connector)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class Connector(httpcore.SyncBackend):
    """httpcore's connects, each ended at once by `abandon()` (ChatStream.abort: a cancel, the
    deadline). Each connection made checks that what answers it speaks HTTP (HttpAnswerCheck).
    A connect has no socket that another thread could shut, so it is made in a worker
    thread while the request's thread waits for it or for the abandon; a connection made after
    that is closed. The wait also ends at a Ctrl-C, as the connect itself did."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._abandoned = False
        self._attempt: _Attempt | None = None
        # a byte came on one of the connections made here since the client last cleared it (requests
        # run one at a time: of the request being made), so an answer began
        self.heard = False

    def reset(self) -> None:
        """Before a request: its connects are made again."""
        with self._lock:
            self._abandoned = False

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            attempt = self._attempt
        if attempt is not None:
            attempt.settled.set()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> httpcore.NetworkStream:
        attempt = _Attempt()
        with self._lock:
            if self._abandoned:
                raise httpcore.ConnectError("abandoned")  # ChatStream takes it for the abort it is
            self._attempt = attempt
        connect = super().connect_tcp
        start_worker(lambda: attempt.run(lambda: connect(host, port, timeout, local_address, socket_options)),
                     "remote-connect")  # fmt: skip
        try:
            attempt.settled.wait()
            with self._lock:
                self._attempt = None
                abandoned = self._abandoned
            if abandoned:
                raise httpcore.ConnectError("abandoned")
            return HttpAnswerCheck(attempt.outcome(), self)
        except BaseException:
            attempt.give_up()
            raise


def connect_with(http: httpx.Client, connector: Connector) -> None:
    """httpx takes no network backend of its own: it goes into the connection pool of each transport
    the client may use, its default one and one per proxy from the environment (HTTP_PROXY, …;
    their pools, httpcore's HTTPProxy and SOCKSProxy, are ConnectionPools too). Where that is not
    there (another httpx), connects end at their timeout, as they did."""
    mounts = getattr(http, "_mounts", None)
    proxies = list(mounts.values()) if isinstance(mounts, dict) else []
    for transport in [getattr(http, "_transport", None), *proxies]:  # a NO_PROXY host's is None
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.ConnectionPool) and hasattr(pool, "_network_backend"):
            pool._network_backend = connector
