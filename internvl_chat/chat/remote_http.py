"""A thin HTTP client for OpenAI-compatible servers: GET /models, streaming POST /chat/completions.

Every failure becomes one `RemoteError` line that starts with what happened (the HTTP status
first, when there is one) and ends with what to do. Error bodies come in two shapes and both are
read: OpenAI's nested `{"error": {"message", "type", "code"}}` (vLLM, llama.cpp, Ollama) and the
flat `{"object": "error", "message", "type", "code"}` (lmdeploy, SGLang, older vLLM); an error in
the middle of a stream arrives as a `data: {"error": …}` event (or an `event: error`). Nothing is
retried behind the user's back. Text that came from the server is shown escaped and shortened.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from http import HTTPStatus
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from .. import __version__, proxy_env
from ..errors import RemoteError, UsageError
from ..files import undecodable_byte, visible
from ..settings import without_credentials
from ..threads import start_worker
from .advice import Advice, any_of
from .sse import SSEDecoder, StreamFailed

ERROR_BODY_LIMIT = 64 << 10  # bytes of an error body worth reading
# A non-streamed answer or a model list (real ones are kilobytes). Parsed JSON takes up to ~30× its
# text, and one read of gzip inflates ~1000×: 64 MiB let ~64 KB sent become ~1.5 GiB.
JSON_BODY_LIMIT = 8 << 20
SHOWN_CHARS = 300  # of a server's error message
MODEL_ID_MAX_CHARS = 4096  # a path-like id of a real server is far shorter (PATH_MAX)
CONNECT_TIMEOUT_S = 30.0
FEED_BYTES = 64 << 10  # of an event stream decoded at a time (a network read's size)
BOUNDED_ENCODINGS = ("gzip", "deflate")  # inflated one network read at a time: at most ~1000× a read

_HINTS = {
    400: "check the message, the attachments and the settings",
    401: "check --api-key (or OPENAI_API_KEY)",
    403: "check --api-key (or OPENAI_API_KEY)",
    404: "check --server (it usually ends in /v1) and --remote-model",
    408: "try again",
    422: "the server did not accept the request's fields; try --dialect generic",
    429: "the server is busy; try again later",
}
# How servers say that the conversation and the answer asked for do not fit their context (serve
# and OpenAI: code context_length_exceeded; llama.cpp: exceed_context_size_error; vLLM, SGLang:
# "maximum context length", "context length"; lmdeploy: session_len)
CONTEXT_OVERFLOW = re.compile(r"context[_ ](length|size|window)|exceed_context|maximum context|session_len", re.IGNORECASE)
# How servers refuse a request for holding too many pictures (serve: "more than 32 images and
# videos"; vLLM: "At most 8 image(s) may be provided in one prompt"): every turn resends them all
TOO_MANY_MEDIA = re.compile(r"(more than|at most) \d+ (image|video)|too many (image|video)", re.IGNORECASE)


# How OpenSSL versions say that the answer to a TLS handshake was not TLS (a plain HTTP server)
NOT_TLS = re.compile(r"WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|PACKET_LENGTH_TOO_LONG")


def too_large_hint(advice: Advice) -> str:
    """For a 413: the request's body is over the server's limit."""
    if not advice.commands:
        return "the request is too large for this server; attach fewer or smaller pictures"
    if not advice.earlier:
        return "the request is too large for this server; /drop attachments, or attach smaller pictures"
    return ("the request is too large for this server (every picture of the conversation is resent each turn); "
            "/drop attachments, /undo or /clear, or attach smaller pictures")  # fmt: skip


def too_many_media_hint(advice: Advice) -> str:
    if not (advice.commands and advice.earlier):
        return f"the server takes no more pictures in one request; {advice.fewer_attachments}"
    return ("every picture of the conversation is resent each turn and the server takes no more; "
            "/drop attachments, /undo or /clear")  # fmt: skip


# How servers refuse a model they do not serve (serve, vLLM, lmdeploy, SGLang: "The model 'x' does
# not exist"; Ollama: "model 'x' not found")
NAMES_A_MODEL = re.compile(r"\bmodel\b", re.IGNORECASE)


def unknown_model_hint(model: str, advice: Advice) -> str:
    """For a chat request's 404 that names the model, after the handshake found it: the server now
    serves another (it was restarted). The model cannot change in a running conversation."""
    if not advice.commands:
        return "check --server (it usually ends in /v1) and --remote-model"
    return (f"the server no longer serves {shorten(model, 80)!r} (restarted with another model?) and the model "
            "cannot change here: /save, then restart internvl-chat with --remote-model set to the model it "
            "serves, and /load the conversation")  # fmt: skip


class ContextRefused(RemoteError):
    """A 400 that says the conversation and its answer do not fit the server's context (CONTEXT_OVERFLOW)."""


def context_refusal(advice: Advice, limit: int | None = None, was: int | None = None) -> str:
    """The one line for a turn the server refused as too long for its context: without the server's
    own words (vLLM's alone fill two terminal lines), with the limit when known, said as news when
    it is not `was` (a re-read of the model list found a server restarted with another context)."""
    if limit is None:
        context = "the server's context"
    elif was is not None and was != limit:
        context = f"the server's context, now {limit:,} tokens"  # (the old limit would wrap the line)
    else:
        context = f"the server's {limit:,}-token context"
    fixes = any_of([advice.fewer_media, *advice.forget("/undo or /clear"), advice.smaller_answer])
    return f"this turn and its answer do not fit {context}; {fixes}"


def normalize_base_url(url: str) -> str:
    """`host:8000`, `http://host:8000`, `http://host:8000/v1/` → `http://host:8000/v1`.

    A bare server address gets `/v1`; a URL with another path is taken as the API's own root.
    """
    text = url.strip()
    if not text:
        raise UsageError("the server URL is empty; pass --server http://HOST:PORT/v1")
    if not text.isprintable():
        raise UsageError(f"{visible(url)} has control or invisible characters; pass --server http://HOST:PORT/v1")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        raise UsageError(f"{visible(url)} is not a valid URL; pass --server http://HOST:PORT/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{visible(without_credentials(url))!s} is not an http(s) server URL; pass --server http://HOST:PORT/v1")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise UsageError(f"{visible(without_credentials(url))} has a bad port number; pass --server http://HOST:PORT/v1") from None
    if parts.query or parts.fragment:
        raise UsageError(f"{visible(without_credentials(url))} has a query or fragment; pass the API root, e.g. http://HOST:PORT/v1")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """Server text for one terminal line: escaped, whitespace folded, cut to `limit`."""
    one_line = " ".join(visible(text).split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def error_text(obj: object) -> str | None:
    """The message of an OpenAI-style error object, nested or flat; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    inner = obj.get("error")
    if isinstance(inner, str):
        return inner
    if isinstance(inner, dict):
        obj = inner
    elif obj.get("object") != "error" and "message" not in obj and "detail" not in obj:
        return None  # not an error object (FastAPI's own errors carry `detail`)
    message = obj.get("message") or obj.get("msg") or obj.get("detail")
    if isinstance(message, list):  # FastAPI validation errors: [{"loc": …, "msg": …}]
        message = "; ".join(str(m.get("msg", m)) if isinstance(m, dict) else str(m) for m in message)
    text = str(message) if message else ""
    kind = obj.get("type") or obj.get("code")
    if kind and str(kind) not in text:
        text = f"{text} ({kind})" if text else str(kind)
    return text or None


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return str(status)


def http_error(status: int, body: bytes, retry_after: str | None, location: str | None = None,
               advice: Advice = Advice(), model: str | None = None) -> RemoteError:  # fmt: skip
    """One line for a non-200 answer: the status first, then the server's message, then a hint
    (a context overflow is its own short line, context_refusal)
    (`advice`: the fixes a refused chat request can name, chat/advice.py; `model`: the model a
    chat request named, None for other requests)."""
    detail = None
    try:
        detail = error_text(json.loads(body.decode("utf-8", errors="replace")))
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        pass
    if detail is None and body.strip():
        detail = body.decode("utf-8", errors="replace")
    if status >= 500:
        hint = "the server failed; try again, or look at its log"
    elif 300 <= status < 400:  # redirects are never followed (they could lead anywhere, with the key)
        where = f"it redirects to {shorten(location, 120)}, which" if location else "a redirect"
        hint = f"{where} is not followed; check --server (https?)"
    elif status == 400 and CONTEXT_OVERFLOW.search(body.decode("utf-8", errors="replace")):
        return ContextRefused(context_refusal(advice))  # RemoteConversation adds the limit
    elif status == 400 and TOO_MANY_MEDIA.search(body.decode("utf-8", errors="replace")):
        hint = too_many_media_hint(advice)
    elif status == 413:
        hint = too_large_hint(advice)
    elif status == 404 and model is not None and NAMES_A_MODEL.search(body.decode("utf-8", errors="replace")):
        hint = unknown_model_hint(model, advice)
    else:
        hint = _HINTS.get(status, "check the request")
    wait = (retry_after or "").strip()
    if status in (429, 503) and wait.isascii() and wait.isdigit() and len(wait) <= 6:  # int() refuses "²" and 5000 digits
        hint += f" (it asks to wait {int(wait)} s)"
    said = f": {shorten(detail)}" if detail else ""
    return RemoteError(f"the server answered {_status_line(status)}{said}; {hint}")


def check_encoding(response: httpx.Response) -> None:
    """Refuse a body whose compression could inflate without bound before any of it is read: httpx
    inflates stacked layers (`gzip, gzip`) or unknown ones in one go, so a few hundred bytes can
    become gigabytes. One layer of gzip or deflate is fine."""
    said = response.headers.get("content-encoding", "")
    layers = [e.strip().lower() for e in said.split(",") if e.strip().lower() not in ("", "identity")]
    if len(layers) > 1 or any(e not in BOUNDED_ENCODINGS for e in layers):
        raise RemoteError(
            f"the server compressed its answer as {shorten(said, 60)}; only one layer of gzip or deflate is read; "
            "check --server (or the proxy in front of it)"
        )


def _mib(limit: int) -> str:
    return f"{limit >> 20} MiB"


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return shorten(text, 160)


# What can fail below HTTP: the connection, or the body's compression (DecodingError is no TransportError)
BROKEN = (httpx.TransportError, httpx.DecodingError)


def transport_error(err: httpx.TransportError | httpx.DecodingError, url: str, timeout: float, mid_answer: bool) -> RemoteError:
    """One line for a failure below HTTP: refused, reset, timed out, unreadable, not inflatable."""
    if isinstance(err, httpx.DecodingError):
        return StreamFailed(f"the server's compressed answer does not inflate ({_reason(err)})",
                            "check --server (or the proxy in front of it)")  # fmt: skip
    if isinstance(err, httpx.ConnectTimeout):
        return RemoteError(f"connecting to {url} timed out after {min(timeout, CONNECT_TIMEOUT_S):g} s; check --server and the network")
    if isinstance(err, httpx.ConnectError):
        if url.startswith("https:") and NOT_TLS.search(str(err)):
            return RemoteError(f"cannot connect to {url}: the server does not speak TLS; use http:// in --server")
        return RemoteError(f"cannot connect to {url} ({_reason(err)}); is the server running? check --server")
    if isinstance(err, httpx.ReadTimeout):
        return StreamFailed(f"the server sent nothing for {timeout:g} s",
                            "it may be overloaded: try again, or raise [remote] timeout to wait longer")  # fmt: skip
    if isinstance(err, httpx.TimeoutException):
        return StreamFailed(f"talking to {url} timed out ({_reason(err)})", "try again")
    # mid-answer, RemoteConversation keeps the text that came before the break (`what` is its note)
    where = "in the middle of the answer" if mid_answer else "before the answer began"
    return StreamFailed(f"the connection to {url} broke {where} ({_reason(err)})", "ask again")


def _has_text(chunk: dict) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and isinstance(c.get("delta"), dict) and isinstance(c["delta"].get("content"), str)
        and c["delta"]["content"] != "" for c in choices
    )  # fmt: skip


def _shut(sock: socket.socket) -> None:
    """End every read blocked in `sock` at once (the plain socket's shutdown: an SSLSocket's own
    would unwrap it under the read)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed (by either side)


def shut_all(sockets: weakref.WeakSet[socket.socket]) -> None:
    """`_shut` each of a client's sockets, from a watcher thread: the thread making requests may
    add one meanwhile, which ends an iteration of the set with a RuntimeError; it is read again."""
    for _ in range(100):
        try:
            current = list(sockets)
        except RuntimeError:  # "Set changed size during iteration"
            continue
        for sock in current:
            _shut(sock)
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


class Connector(httpcore.SyncBackend):
    """httpcore's connects, each ended at once by `abandon()` (ChatStream.abort: a cancel, the
    deadline). A connect has no socket that another thread could shut, so it is made in a worker
    thread while the request's thread waits for it or for the abandon; a connection made after
    that is closed. The wait also ends at a Ctrl-C, as the connect itself did."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._abandoned = False
        self._attempt: _Attempt | None = None

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
            return attempt.outcome()
        except BaseException:
            attempt.give_up()
            raise


def _connect_with(http: httpx.Client, connector: Connector) -> None:
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


def head_late(timeout: float) -> RemoteError:
    return RemoteError(
        f"the server took over {timeout:g} s to send the head of its answer; it may be overloaded: try again, "
        "or raise [remote] timeout to wait longer"
    )


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
                _shut(self._socket)
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
            body = _read_limited(response, JSON_BODY_LIMIT + 1, client.timeout)
            if len(body) > JSON_BODY_LIMIT:
                raise RemoteError(f"the server's answer is over {_mib(JSON_BODY_LIMIT)}; is --server an OpenAI-compatible server?")
            yield _whole_answer_as_chunk(body)
            self.done = True
            return
        if kind != "text/event-stream":
            raise RemoteError(
                f"the server answered with {shorten(kind, 60) or 'no content type'}, not an event stream; "
                "is --server the API root of an OpenAI-compatible server (…/v1)?"
            )
        decoder = SSEDecoder()
        # the read timeout restarts with every byte: keep-alives, blank lines or a line that
        # never ends would hold the answer forever, so they count as nothing sent
        last_event = time.monotonic()
        for piece in _pieces(response.iter_bytes()):
            events = decoder.feed(piece)
            for event in events:
                chunk = _parse_event(event.event, event.data)
                if chunk is None:
                    self.done = True
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
        for event in decoder.finish():
            chunk = _parse_event(event.event, event.data)
            if chunk is None:
                self.done = True
                return
            yield chunk


def _pieces(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body in pieces of at most FEED_BYTES: a read of gzip inflates to ~1000× its size, and all
    its events would be decoded at once, however few of them the answer loop goes on to take."""
    for chunk in chunks:
        for start in range(0, len(chunk), FEED_BYTES):
            yield chunk[start : start + FEED_BYTES]


def _read_limited(response: httpx.Response, limit: int, timeout: float) -> bytes:
    """At most `limit` bytes of the body, within `timeout` s in all (a body trickled a byte at a time
    would restart the read timeout with each byte)."""
    parts: list[bytes] = []
    total = 0
    started = time.monotonic()
    for raw in response.iter_bytes():
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
        obj = json.loads(body.decode("utf-8", errors="replace"))
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


class ApiClient:
    """One server: base URL, key, timeout, and a pooled connection."""

    def __init__(self, server: str, api_key: str = "", timeout: float = 300.0):
        if not timeout > 0:
            raise UsageError(f"the remote timeout must be a positive number of seconds, not {timeout!r}")
        self.base_url = normalize_base_url(server)
        self.shown_url = without_credentials(self.base_url)  # httpx sends user:password as Basic auth
        self.timeout = float(timeout)
        self.connect_s = min(self.timeout, CONNECT_TIMEOUT_S)
        self.advice = Advice()  # the fixes a refused chat request names; each ChatStream sets its own
        self.chat_model: str | None = None  # the model the chat request being made names; None: no chat
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # of every connection made
        self.connector = Connector()  # makes the connects, which ChatStream.abort can end
        self.head_watch: HeadWatch | None = None  # of the latest request
        # a request failed below HTTP (refused, reset, timed out): the server may have restarted since,
        # with another context; RemoteConversation re-reads the model list before its next request
        self.broke = False
        headers = {"User-Agent": f"internvl-chat/{__version__}", "Accept": "application/json",
                   "Accept-Encoding": ", ".join(BOUNDED_ENCODINGS)}  # fmt: skip
        if api_key:
            if any(c in api_key for c in "\r\n") or not api_key.isprintable():
                raise UsageError("the API key has control characters; check --api-key or OPENAI_API_KEY")
            if not api_key.isascii():  # httpx would fail later, and the error would blame the URL
                raise UsageError("the API key has characters that are not ASCII, which an HTTP header cannot carry; "
                                 "check --api-key or OPENAI_API_KEY")  # fmt: skip
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            self.http = proxy_env.client(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_s),
                follow_redirects=False,
                event_hooks={"response": [self._check_response]},
            )
            self.http.build_request("GET", "models")  # httpx checks the host (IDNA) only here; sends nothing
            _connect_with(self.http, self.connector)
            self.proxy = proxy_env.proxy_of(self.http, self.base_url)  # a failed connect blames it, not the server
        except (httpx.InvalidURL, ValueError) as e:  # e.g. a host name that is not valid IDNA (xn--)
            raise UsageError(f"{visible(without_credentials(server))} is not a usable URL ({_reason(e)}); pass --server http://HOST:PORT/v1") from None

    def close(self) -> None:
        self.http.close()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace of a request: the sockets it connects, and when the head is waited for."""
        # connection.…; socks.… for a connect through a SOCKS proxy, proxy.… for TLS in an HTTP proxy's tunnel
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                self._sockets.add(sock)
                if self.connector.abandoned:  # an abort as the connect ended: after abandon and shut_all had looked
                    _shut(sock)
        elif event == "http11.send_request_body.complete":  # the time to upload pictures does not count
            self.head_watch = HeadWatch(self._sockets, self.timeout)
        elif event in ("http11.receive_response_headers.complete", "http11.receive_response_headers.failed") \
                and self.head_watch is not None:  # fmt: skip
            self.head_watch.stop()

    def _check_response(self, response: httpx.Response) -> None:
        """Every answer's compression and status, as soon as its head arrives: before httpx parses a
        redirect's Location (a malformed one would fail there as if the connection had broken)."""
        check_encoding(response)
        if response.status_code == 407 and self.proxy is not None:  # only a proxy sends it: the one we went through
            raise RemoteError(f"{self.proxy} asks for credentials (407 Proxy Authentication Required); put the right "
                              "ones in its URL (http://USER:PASSWORD@HOST:PORT), or add the server's host to NO_PROXY")  # fmt: skip
        if response.status_code != 200:
            raise http_error(response.status_code, _read_limited(response, ERROR_BODY_LIMIT, self.timeout),
                             response.headers.get("retry-after"), response.headers.get("location"),
                             self.advice, self.chat_model)  # fmt: skip

    def stream(self, method: str, path: str, connect_s: float | None = None, **kwargs):
        """httpx's streamed request, its head watched (`trace`); `connect_s`: a shorter connect timeout."""
        self.head_watch = None
        if connect_s is not None:
            kwargs["timeout"] = httpx.Timeout(self.timeout, connect=min(connect_s, self.connect_s))
        return self.http.stream(method, path, extensions={"trace": self.trace}, **kwargs)

    def broken(self, err: httpx.TransportError | httpx.DecodingError, mid_answer: bool) -> RemoteError:
        """One line for a request that failed below HTTP (a head that came too late says so)."""
        self.broke = True
        if self.head_watch is not None and self.head_watch.fired:
            return head_late(self.timeout)
        if self.proxy is not None and isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)):
            return RemoteError(f"cannot reach {self.shown_url} through {self.proxy} ({_reason(err)}); "
                               "check the proxy, or add the server's host to NO_PROXY")  # fmt: skip
        return transport_error(err, self.shown_url, self.timeout, mid_answer)

    def get_json(self, path: str) -> object:
        self.advice, self.chat_model = Advice(), None  # not a chat: no chat request's hints
        self.connector.reset()
        try:
            with self.stream("GET", path) as response:
                body = _read_limited(response, JSON_BODY_LIMIT + 1, self.timeout)
        except BROKEN as e:
            raise self.broken(e, mid_answer=False) from None
        if len(body) > JSON_BODY_LIMIT:
            raise RemoteError(f"the server's answer to GET {path} is over {_mib(JSON_BODY_LIMIT)}; is --server right?")
        try:
            return json.loads(body.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
            raise RemoteError(f"the server's answer to GET {path} is not JSON; is --server the API root (…/v1)?") from None

    def models(self) -> list[dict]:
        """The model cards of GET /models (each with a string `id`), in the server's order."""
        data = self.get_json("models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise RemoteError("the server's model list has no `data` array; is --server an OpenAI-compatible server (…/v1)?")
        return [card for card in cards if isinstance(card, dict) and _usable_id(card.get("id"))]

    def stream_chat(self, body: dict, advice: Advice = Advice(), connect_s: float | None = None) -> ChatStream:
        """`advice`: what a refusal's hint may name (commands or flags; /undo or /clear only with
        earlier turns in the request); `connect_s`: the time left to the answer's deadline."""
        return ChatStream(self, body, advice, connect_s)


def _usable_id(model_id: object) -> bool:
    """A model id a request can name and a banner can show: a string, not empty, not absurdly long,
    without a lone surrogate (a JSON `\\ud800` escape), which a UTF-8 request body cannot hold."""
    return (
        isinstance(model_id, str)
        and 0 < len(model_id) <= MODEL_ID_MAX_CHARS
        and undecodable_byte(model_id) is None
    )
