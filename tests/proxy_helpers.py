"""Fake proxies: one that answers every request with an error page of its own, as real proxies do, and
one that tunnels every CONNECT to a local port."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from remote_helpers import connections_handled_by

REASONS = {403: b"Forbidden", 407: b"Proxy Authentication Required", 502: b"Bad Gateway"}


@contextlib.contextmanager
def error_page_proxy(status_for: Callable[[bytes], int], join_s: float = 60) -> Iterator[int]:
    """A proxy on a local port (yielded) that reads each request's head (a plain-HTTP proxy's GET,
    or a CONNECT) and answers `status_for(head)` with an HTML page, then closes."""
    listener, stopping = socket.socket(), threading.Event()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer() -> None:
        while True:
            conn, _ = listener.accept()
            if stopping.is_set():
                conn.close()
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    block = conn.recv(4096)
                    if not block:
                        break
                    head += block
                status, page = status_for(head), b"<html>the proxy says no</html>"
                conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/html\r\nConnection: close\r\n"
                             b"Proxy-Authenticate: Basic realm=\"p\"\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, REASONS.get(status, b"Nope"), len(page), page))  # fmt: skip

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        socket.create_connection(listener.getsockname()).close()  # wakes the accept (a close does not)
        thread.join(join_s)
        listener.close()


@contextlib.contextmanager
def tunnel_proxy(target_port: int) -> Iterator[int]:
    """A proxy on a local port (yielded) that answers every CONNECT with 200 and then relays the
    connection's bytes both ways to 127.0.0.1:`target_port`, whatever host the CONNECT named."""
    def relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while block := source.recv(65536):
                sink.sendall(block)
        except OSError:
            pass  # either side hung up
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def tunnel(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            block = conn.recv(4096)
            if not block:
                conn.close()
                return
            head += block
        target = socket.create_connection(("127.0.0.1", target_port))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=relay, args=(target, conn), daemon=True).start()
        relay(conn, target)
        conn.close()
        target.close()

    with connections_handled_by(tunnel) as port:
        yield port
