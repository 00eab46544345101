"""A thin HTTP client for OpenAI-compatible servers: GET /models, streaming POST /chat/completions.

Every failure becomes one `RemoteError` line (remote_errors.py); the answer's stream is read by
remote_stream.py, and the sockets are kept where another thread can end a read (remote_sockets.py).
A request is sent again only where it went out on a kept connection that the server had closed (or
closed as the request came) and nothing of an answer came back: once, on a new connection.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import Cookie, CookieJar
from urllib.parse import urlsplit, urlunsplit

import httpx

from .. import __version__, proxy_env
from ..errors import RemoteError, UsageError
from ..files import undecodable_byte, visible
from ..settings import without_credentials
from .advice import Advice
from .remote_errors import (
    BROKEN,
    GATEWAY_HINTS,
    head_late,
    http_error,
    json_from_server,
    mib,
    not_http,
    page_note,
    reason,
    shorten,
    tls_refusal,
    transport_error,
    unparsable,
)
from .remote_sockets import Connector, HeadWatch, connect_with, shut
from .remote_stream import JSON_BODY_LIMIT, ChatStream, read_limited

ERROR_BODY_LIMIT = 64 << 10  # bytes of an error body worth reading
MODEL_ID_MAX_CHARS = 4096  # a path-like id of a real server is far shorter (PATH_MAX)
CONNECT_TIMEOUT_S = 30.0
BOUNDED_ENCODINGS = ("gzip", "deflate")  # inflated one network read at a time: at most ~1000× a read
# An idle pooled connection is given up before the 5 s after which uvicorn (vLLM, SGLang, our serve)
# and llama.cpp close theirs (httpx's own default is 5 s too): a request sent on a connection the
# server is closing fails as "disconnected without sending a response" (sent again then: `stale`).
KEEPALIVE_S = 4.0
# Cookies are kept, in a small jar: a gateway in front of several server replicas may pin a
# conversation to one of them with a sticky-session cookie (nginx's sticky, an AWS load balancer's
# AWSALB, a Kubernetes ingress's affinity cookie), and that replica holds its prompt cache. httpx's
# own jar keeps every cookie a server sets, for the whole session, and sends them all back: a server
# setting thousands across the turns (each response's head may hold 100 KiB of them) grew memory
# and every request without bound. A cookie that would pass a bound is not kept.
MAX_COOKIES = 16
COOKIE_CHARS = 4096  # name and value: the size RFC 6265 asks clients to keep at least


class BoundedCookieJar(CookieJar):
    """A cookie jar of at most MAX_COOKIES cookies, each at most COOKIE_CHARS: one already kept
    (the same domain, path and name) is still replaced (or deleted, by an expiry in the past); a new
    one is dropped once the jar is full of cookies that have not expired. The stdlib's jar takes
    care of domains, paths and expiry."""

    def set_cookie(self, cookie: Cookie) -> None:
        if len(cookie.name) + len(cookie.value or "") > COOKIE_CHARS:
            return
        kept = [(c.domain, c.path, c.name) for c in self]  # requests run one at a time: no race here
        if (cookie.domain, cookie.path, cookie.name) not in kept and len(kept) >= MAX_COOKIES:
            # expired ones make room: nothing else clears them (httpx does it in each request's copy of the jar)
            self.clear_expired_cookies()
            if len(self) >= MAX_COOKIES:
                return
        super().set_cookie(cookie)


def normalize_base_url(url: str) -> str:
    """`host:8000`, `http://host:8000`, `http://host:8000/v1/` → `http://host:8000/v1`.

    A bare server address gets `/v1`; a URL with another path is taken as the API's own root.
    """
    text = url.strip()
    if not text:
        raise UsageError("the server URL is empty; pass --server http://HOST:PORT/v1")
    if not text.isprintable():
        raise UsageError(f"{visible(without_credentials(url))} has control or invisible characters; "
                         "pass --server http://HOST:PORT/v1")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        raise UsageError(f"{visible(without_credentials(url))} is not a valid URL; "
                         "pass --server http://HOST:PORT/v1") from None
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


# where a key comes from, the first one set winning (the config file is a place to look too)
_KEY_SOURCES = "check --api-key, [remote] api_key in the config file and the OPENAI_API_KEY environment variable"


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
        self.head_failed = False  # the latest request's head could not be read (the server hung up, or sent no HTTP)
        # the latest request's TLS handshake with the server failed inside a proxy's tunnel: the proxy
        # did its part (an https:// proxy's own handshake is traced as the connection's)
        self.tunnel_tls_failed = False
        self.connected = False  # the latest request made a connection (not one kept in the pool)
        # a request failed below HTTP (refused, reset, timed out), or a proxy said the server behind it
        # is not there (502-504): the server may have restarted since, with another context;
        # RemoteConversation re-reads the model list before its next request
        self.broke = False
        headers = {"User-Agent": f"internvl-chat/{__version__}", "Accept": "application/json",
                   "Accept-Encoding": ", ".join(BOUNDED_ENCODINGS)}  # fmt: skip
        if api_key:
            if any(c in api_key for c in "\r\n") or not api_key.isprintable():
                raise UsageError(f"the API key has control characters; {_KEY_SOURCES}")
            if not api_key.isascii():  # httpx would fail later, and the error would blame the URL
                raise UsageError("the API key has characters that are not ASCII, which an HTTP header cannot carry; "
                                 f"{_KEY_SOURCES}")  # fmt: skip
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            self.http = proxy_env.client(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_s),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_S),
                follow_redirects=False,
                cookies=BoundedCookieJar(),
                event_hooks={"response": [self._check_response]},
            )
            self.http.build_request("GET", "models")  # httpx checks the host (IDNA) only here; sends nothing
            connect_with(self.http, self.connector)
            self.proxy = proxy_env.proxy_of(self.http, self.base_url)  # a failed connect blames it, not the server
        except (httpx.InvalidURL, ValueError) as e:  # e.g. a host name that is not valid IDNA (xn--)
            raise UsageError(f"{visible(without_credentials(server))} is not a usable URL ({reason(e)}); pass --server http://HOST:PORT/v1") from None

    def close(self) -> None:
        self.http.close()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace of a request: the sockets it connects, and when the head is waited for."""
        # connection.…; socks.… for a connect through a SOCKS proxy, proxy.… for TLS in an HTTP proxy's tunnel
        if event.endswith(".connect_tcp.started"):
            self.connected = True
        elif event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                self._sockets.add(sock)
                if self.connector.abandoned:  # an abort as the connect ended: after abandon and shut_all had looked
                    shut(sock)
        elif event == "proxy.start_tls.failed":  # the handshake with the server, in the proxy's tunnel
            self.tunnel_tls_failed = True
        elif event == "http11.send_request_body.complete":  # the time to upload pictures does not count
            self.head_watch = HeadWatch(self._sockets, self.timeout)
        elif event in ("http11.receive_response_headers.complete", "http11.receive_response_headers.failed"):
            self.head_failed = event.endswith(".failed")
            if self.head_watch is not None:
                self.head_watch.stop()

    def _check_response(self, response: httpx.Response) -> None:
        """Every answer's compression and status, as soon as its head arrives: before httpx parses a
        redirect's Location (a malformed one would fail there as if the connection had broken)."""
        check_encoding(response)
        if response.status_code == 407 and self.proxy is not None:  # only a proxy sends it: the one we went through
            raise RemoteError(f"{self.proxy} asks for credentials (407 Proxy Authentication Required); put the right "
                              "ones in its URL (http://USER:PASSWORD@HOST:PORT), or add the server's host to NO_PROXY")  # fmt: skip
        if response.status_code in GATEWAY_HINTS:  # a proxy's: the server behind it down or starting
            self.broke = True  # (a server's own 503, busy, costs one re-read of the model list)
        if response.status_code != 200:
            raise http_error(response.status_code, read_limited(response, ERROR_BODY_LIMIT, self.timeout),
                             response.headers.get("retry-after"), response.headers.get("location"),
                             self.advice, self.chat_model, response.headers.get("content-type"),
                             str(response.request.url))  # fmt: skip

    @contextmanager
    def stream(self, method: str, path: str, connect_s: float | None = None, **kwargs) -> Iterator[httpx.Response]:
        """httpx's streamed request, its head watched (`trace`); `connect_s`: a shorter connect timeout.
        Sent once more, on a new connection, where a kept one turned out closed (`stale`): its body is
        bytes (a chat request's pictures too, as data: URLs), sent again as they are."""
        if connect_s is not None:
            kwargs["timeout"] = httpx.Timeout(self.timeout, connect=min(connect_s, self.connect_s))
        request = self.http.build_request(method, path, extensions={"trace": self.trace}, **kwargs)
        for again in (False, True):
            self.head_watch, self.head_failed, self.tunnel_tls_failed = None, False, False
            self.connected = self.connector.heard = False
            try:
                response = self.http.send(request, stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                if again or not self.stale(e):
                    raise
        try:
            yield response
        finally:
            response.close()

    def stale(self, err: httpx.TransportError) -> bool:
        """Whether a request failed as one on a kept connection the server closed while it was idle
        (a server whose idle timeout is shorter than KEEPALIVE_S, or one that closes it as the request
        comes): it went out on a connection from the pool, and the connection ended (closed, reset)
        before a byte of an answer came, not by a cancel, the head's time limit or bytes that are no
        HTTP. httpcore goes on to wait for the head after a failed write, so all end there. The server
        may not have seen the request; as urllib3 and the openai package do, it is sent again."""
        return (
            not self.connected
            and self.head_failed
            and not self.connector.heard
            and not self.connector.abandoned
            and not (self.head_watch is not None and self.head_watch.fired)
            and not unparsable(err)
        )

    def broken(self, err: httpx.TransportError | httpx.DecodingError, mid_answer: bool) -> RemoteError:
        """One line for a request that failed below HTTP (a head that came too late says so)."""
        self.broke = True
        if self.head_watch is not None and self.head_watch.fired:
            return head_late(self.timeout)
        if self.head_failed and isinstance(err, httpx.RemoteProtocolError) and unparsable(err):
            return not_http(self.shown_url, err, self.proxy)  # "ask again" would get the same
        if self.tunnel_tls_failed and isinstance(err, httpx.ConnectError):
            refused = tls_refusal(err, self.shown_url)  # the server's certificate, not the proxy's fault
            if refused is not None:
                return refused
        if self.proxy is not None and isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)):
            return RemoteError(f"cannot reach {self.shown_url} through {self.proxy} ({reason(err)}); "
                               "check the proxy, or add the server's host to NO_PROXY")  # fmt: skip
        return transport_error(err, self.shown_url, self.timeout, self.connect_s, mid_answer)

    def get_json(self, path: str) -> object:
        self.advice, self.chat_model = Advice(), None  # not a chat: no chat request's hints
        self.connector.reset()
        try:
            with self.stream("GET", path) as response:
                body = read_limited(response, JSON_BODY_LIMIT + 1, self.timeout)
                content_type = response.headers.get("content-type")
        except BROKEN as e:
            raise self.broken(e, mid_answer=False) from None
        if len(body) > JSON_BODY_LIMIT:
            raise RemoteError(f"the server's answer to GET {path} is over {mib(JSON_BODY_LIMIT)}; is --server right?")
        try:
            return json_from_server(body)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
            raise RemoteError(f"the server's answer to GET {path} is not JSON{page_note(body, content_type)}; "
                              "is --server the API root (…/v1)?") from None  # fmt: skip

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
