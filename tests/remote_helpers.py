"""An in-process OpenAI-compatible test server: records requests, replays scripted replies.

Replies are queued per endpoint and consumed in order; each is a status, headers and a body sent
in pieces (chunked transfer encoding, as the real servers stream), optionally ended abnormally:
"reset" closes the socket with an RST, "cut" closes it without the final chunk, "hang" sends
nothing more until the test ends (for read timeouts), "endless" sends the last piece again and
again until the client hangs up or the test ends (keep-alives that never end), or for at most a
minute, then ends the body (so a client that waits for it fails instead of hanging the test);
"drop" closes the connection once the request has been read, sending nothing (a server that closes
an idle kept-alive connection just as the next request arrives), "drop-reset" the same with an RST,
"mute" sends nothing at all, not even the head, until the test ends.
A reply's `held` pieces are sent one per `go_on.release()`: the client is mid-answer for as long
as the test needs, and shows when it has read on.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ENDLESS_S = 60.0  # how long an "endless" reply lasts at most
WAIT_S = 60.0  # the longest a test waits for the server's thread to have done something
HELD_AT_EXIT = 1000  # `held` pieces let go when the test ends (more than any reply holds)
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "remote"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@dataclass
class Reply:
    status: int = 200
    pieces: list[bytes] = field(default_factory=list)
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    end: str = "normal"  # "normal" | "reset" | "cut" | "hang" | "endless" | "drop" | "drop-reset" | "mute"
    held: list[bytes] = field(default_factory=list)  # sent after `pieces`, one per `go_on.release()`
    cookies: list[str] = field(default_factory=list)  # each sent as a Set-Cookie header of its own

    @classmethod
    def sse(cls, body: bytes, piece_size: int = 0, end: str = "normal") -> Reply:
        """An event stream, sent whole or in pieces of `piece_size` bytes (splitting lines and characters)."""
        if piece_size <= 0:
            return cls(pieces=[body], end=end)
        return cls(pieces=[body[i : i + piece_size] for i in range(0, len(body), piece_size)], end=end)

    @classmethod
    def json(cls, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return cls(status, [body], "application/json", headers or {})


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class FakeServer:
    def __init__(self, models: bytes | None = None):
        self.requests: list[Recorded] = []
        self.recorded = threading.Condition()  # notified as each request is recorded
        self.replies: dict[str, list[Reply]] = {"/v1/models": [], "/v1/chat/completions": []}
        self.models = models
        self.release = threading.Event()  # lets a "hang" reply finish when the test ends
        self.finished = threading.Event()  # set after a streamed reply has been written completely
        self.go_on = threading.Semaphore(0)  # lets a reply send its next `held` piece
        handler = _make_handler(self)
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def connections(self) -> int:
        """Connections accepted so far (a client that pools its connection makes one for many requests)."""
        return self._server.accepted

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def chat(self, *replies: Reply) -> FakeServer:
        self.replies["/v1/chat/completions"].extend(replies)
        return self

    def chat_bodies(self) -> list[dict]:
        return [r.json for r in self.requests if r.path == "/v1/chat/completions"]

    def chat_bodies_once(self, count: int) -> list[dict]:
        """The chat bodies once `count` have been recorded (or after WAIT_S): a request the client
        sent and then gave up on (a cancel, a head's time limit) is read by the server's thread,
        which a busy machine may not have run yet when the client's turn has ended."""
        with self.recorded:
            self.recorded.wait_for(lambda: len(self.chat_bodies()) >= count, WAIT_S)
        return self.chat_bodies()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.go_on.release(HELD_AT_EXIT)
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        for conn in self._server.taken:  # as a server that stops does: a connection pooled by a client ends too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


class _QuietServer(ThreadingHTTPServer):
    accepted = 0  # connections, counted in the accepting thread before each one's handler starts

    def process_request(self, request, client_address) -> None:
        self.accepted += 1
        self.taken.append(request)
        super().process_request(request, client_address)

    def server_activate(self) -> None:
        self.taken: list[socket.socket] = []  # every connection accepted (their handlers' threads outlive the server)
        super().server_activate()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-reply (a cancelled answer) is expected here


def _make_handler(server: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with server.recorded:
                server.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
                server.recorded.notify_all()

        def do_GET(self) -> None:
            self._record()
            if self.path == "/v1/models" and not server.replies["/v1/models"] and server.models is not None:
                self._send(Reply.json(server.models))
            else:
                self._next()

        def do_POST(self) -> None:
            self._record()
            self._next()

        def _next(self) -> None:
            queue = server.replies.get(self.path)
            if not queue:
                self._send(Reply.json({"error": {"message": f"no reply scripted for {self.path}", "type": "test"}}, 404))
                return
            self._send(queue.pop(0))

        def _send(self, reply: Reply) -> None:
            if reply.end == "mute":
                server.release.wait()
                return
            if reply.end in ("drop", "drop-reset"):  # no answer at all
                if reply.end == "drop-reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            for cookie in reply.cookies:
                self.send_header("Set-Cookie", cookie)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._write(reply.pieces)
            for piece in reply.held:
                server.go_on.acquire()
                self._write([piece])
            if reply.end == "endless":
                piece, left = reply.pieces[-1], ENDLESS_S / 0.02
                try:
                    while not server.release.wait(0.02) and (left := left - 1) > 0:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                except OSError:  # the client hung up
                    return
            if reply.end in ("normal", "endless"):
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                server.finished.set()
                return
            if reply.end == "hang":
                server.release.wait()
            elif reply.end == "reset":  # RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _write(self, pieces: list[bytes]) -> None:
            for piece in filter(None, pieces):  # an empty chunk would end the body
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()

    return Handler


def closed_port() -> int:
    """A local port nothing listens on now (for a server the test starts on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tls_server() -> Iterator[int]:
    """A port whose server makes TLS handshakes with the self-signed certificate of fixtures/remote/tls
    (which no client trusts unless told to), then closes the connection; a client that never starts its
    handshake holds up no other."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(FIXTURES / "tls" / "cert.pem", FIXTURES / "tls" / "key.pem")

    def handshake(conn: socket.socket) -> None:
        try:
            context.wrap_socket(conn, server_side=True).close()
        except OSError:  # the client refused the certificate (ssl.SSLError is an OSError)
            conn.close()

    with connections_handled_by(handshake) as port:
        yield port


@contextmanager
def refusing_port() -> Iterator[int]:
    """A local port that refuses connections while the block runs: bound and not listening. A port
    merely freed could meanwhile be taken by another test's server, or picked as a connection's own
    end, which then connects to itself (TCP's simultaneous open)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A local port where a connection is never made while the block runs: a listener whose accept
    queue (backlog 0: one connection) is full, so the kernel drops every new SYN, as a host that has
    gone away does (it retries for about two minutes, then refuses)."""
    with socket.socket() as listener, socket.socket() as first:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        first.connect(("127.0.0.1", port))  # made at once (the queue was empty), then never accepted
        yield port


@contextmanager
def deaf_server() -> Iterator[str]:
    """A server (its /v1 URL) that accepts connections and never reads from them: a request larger
    than the sockets' buffers can never be sent whole."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    taken: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                taken.append(listener.accept()[0])
            except OSError:
                return  # the test ended

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        listener.close()
        for conn in taken:
            conn.close()


@contextmanager
def connections_handled_by(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A listening local port (yielded) whose every connection `handle` gets in a thread of its own,
    until the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test ended
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@contextmanager
def dripping_server(first: bytes, drip: bytes, seconds: float = 30.0) -> Iterator[str]:
    """A server (its /v1 URL) that answers every request with `first`, then `drip` every 10 ms for
    `seconds` (a head that never ends: its bytes trickled, or `100 Continue` heads one after another),
    then closes. A plain socket: http.server cannot write a broken head."""
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                reader = conn.makefile("rb")
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    length = int(value) if name.strip().lower() == b"content-length" else length
                reader.read(length)
                conn.sendall(first)
                for _ in range(int(seconds / 0.01)):
                    if stop.wait(0.01):
                        return
                    conn.sendall(drip)
            except OSError:
                return  # the client hung up

    with connections_handled_by(answer) as port:
        try:
            yield "http://127.0.0.1:%d/v1" % port
        finally:
            stop.set()
