"""What a failed request to a server says: one `RemoteError` line that starts with what happened
(the HTTP status first, when there is one) and ends with what to do.

Error bodies come in two shapes and both are read: OpenAI's nested `{"error": {"message", "type",
"code"}}` (vLLM, llama.cpp, Ollama) and the flat `{"object": "error", "message", "type", "code"}`
(lmdeploy, SGLang, older vLLM). Text that came from the server is shown escaped and shortened.
"""

from __future__ import annotations

import datetime
import email.utils
import html
import json
import math
import re
import time
from http import HTTPStatus
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import h11
import httpx

from ..errors import RemoteError
from ..files import shortened, visible
from ..settings import WEB_SCHEMES
from .advice import Advice, any_of
from .remote_sockets import NotHttpAnswer
from .sse import StreamFailed

E = TypeVar("E", bound=BaseException)

SHOWN_CHARS = 300  # of a server's error message
PAGE_CHARS = 160  # of a body that is no error object (a proxy's HTML page, plain text)
PAGE_BYTES = 64 << 10  # of an HTML page answered where JSON or a stream was due, read for its title
CONTEXT_SAID_CHARS = 160  # of a context refusal's message: its counts come first (vLLM's whole is ~220)

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


# What a proxy or load balancer in front of a server answers while the server is down, starting or
# slow (nginx, HAProxy, Envoy, cloud balancers; their bodies are HTML pages or plain text)
GATEWAY_HINTS = {
    502: "check that the server is running (and that the proxy reaches it)",
    503: "check that the server is running, or try again later",
    504: "the server did not answer the proxy in time; check that it is running, or try again",
}
# How an HTML page starts (after a byte-order mark or blank lines)
HTML_START = re.compile(r"\s*<(!doctype\s+html|html|head|body|title|h1)\b", re.IGNORECASE)
UNSHOWN_ELEMENTS = ("script", "style")  # markup whose text is no message


# How OpenSSL versions say that the answer to a TLS handshake was not TLS (a plain HTTP server)
NOT_TLS = re.compile(r"WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|PACKET_LENGTH_TOO_LONG")
# How OpenSSL says that the server's certificate is not trusted (self-signed, a private CA's, another host's)
NOT_TRUSTED = re.compile(r"CERTIFICATE_VERIFY_FAILED")


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


# How servers refuse pictures when the model they serve has no vision part (llama.cpp started
# without --mmproj answers 500 "image input is not supported - hint: … provide the mmproj"; vLLM:
# "… is not a multimodal model"): every retry fails alike while the pictures are sent
NO_MEDIA = re.compile(r"(image|video|multimodal) input is not supported|not a multimodal model", re.IGNORECASE)


def no_media_hint(advice: Advice) -> str:
    """For a server that takes no pictures at all: "try again" would fail the same way."""
    what = "the server takes no pictures (llama-server: start it with the model's mmproj file)"
    if not advice.commands:
        return f"{what}; ask without --image and --video"
    if not advice.earlier:
        return f"{what}; /drop attachments"
    return f"{what}; /drop attachments, and /undo or /clear turns that hold pictures (every turn's are resent)"


# How servers refuse a model they do not serve (serve, vLLM, lmdeploy, SGLang: "The model 'x' does
# not exist"; Ollama: "model 'x' not found")
NAMES_A_MODEL = re.compile(r"\bmodel\b", re.IGNORECASE)


def unknown_model_hint(model: str, advice: Advice) -> str:
    """For a chat request's 404 that names the model, after the handshake found it: the server now
    serves another (it was restarted). The model cannot change in a running conversation."""
    if not advice.commands:
        return "check --server (it usually ends in /v1) and --remote-model"
    return (f"the server no longer serves '{shorten(model, 80)}' (restarted with another model?) and the model "
            "cannot change here: /save, then restart internvl-chat with --remote-model set to the model it "
            "serves, and /load the conversation")  # fmt: skip


class ContextRefused(RemoteError):
    """A 400 that says the conversation and its answer do not fit the server's context (CONTEXT_OVERFLOW);
    `said`: the server's own message, kept for the line RemoteConversation makes again with the limit."""

    def __init__(self, line: str, said: str | None = None):
        super().__init__(line)
        self.said = said


def context_refusal(advice: Advice, limit: int | None = None, was: int | None = None, said: str | None = None,
                    retry: Advice | None = None) -> str:  # fmt: skip
    """The one line for a turn the server refused as too long for its context: with the limit when
    known, said as news when it is not `was` (a re-read of the model list found a server restarted
    with another context), and the start of the server's own words (`said`), which hold its counts
    (vLLM: "maximum context length is 32768 tokens. However, you requested 33050 tokens"); the
    fixes come last, in the app's terms (the server's words name its own fields: max_tokens)."""
    if limit is None:
        context = "the server's context"
    elif was is not None and was != limit:
        context = f"the server's context, now {limit:,} tokens"  # (the old limit would wrap the line)
    else:
        context = f"the server's {limit:,}-token context"
    reason = f" (the server said: {shorten(said, CONTEXT_SAID_CHARS)})" if said and said.strip() else ""
    fixes = any_of([advice.smaller_content, *advice.forget("/undo or /clear"), advice.smaller_answer])
    if retry is not None:  # the same question and attachments again (`retry.media`: the turn's own), as the local Session says
        media = "fewer tiles or frames" if retry.tiles else "fewer or smaller pictures, or fewer frames"  # llama.cpp
        again = f"/undo and ask it with {media}" if retry.media else "/undo and ask it shorter"
        fixes = any_of([retry.smaller_answer, again])
    return f"this turn and its answer do not fit {context}{reason}; {fixes}"


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """Server text for one terminal line: escaped, whitespace folded, cut to `limit`."""
    return shortened(" ".join(visible(text).split()), limit)


def error_text(obj: object, with_kind: bool = True) -> str | None:
    """The message of an OpenAI-style error object, nested or flat, followed by its type or code
    unless `with_kind` is False; None when it is not one."""
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
    if not with_kind and text:
        return text
    if kind and str(kind) not in text:
        text = f"{text} ({kind})" if text else str(kind)
    return text or None


def json_from_server(body: bytes) -> object:
    """A server's JSON body parsed, as every reader of one does: UTF-8 (bytes that are not shown as
    U+FFFD), a leading byte-order mark skipped (some servers write one; it is no JSON). Raises
    ValueError, or RecursionError for JSON nested too deep to parse."""
    return json.loads(body.decode("utf-8-sig", errors="replace"))


def error_message(body: bytes, with_kind: bool = True) -> str | None:
    """The message of a body that is an OpenAI-style error (`error_text`); None for any other body."""
    try:
        return error_text(json_from_server(body), with_kind)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return None


def is_html(text: str, content_type: str | None = None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind in ("text/html", "application/xhtml+xml") or HTML_START.match(text) is not None


def page_text(page: str) -> str:
    """What an HTML page says, as one line: its title, else its text without the markup. Found
    with str.find, in one pass: a regex over a hostile page (`<<<<…`, a `<title>` never closed)
    could take quadratic time."""
    lower = page.lower()
    start = lower.find("<title")
    opened = lower.find(">", start) if start >= 0 else -1
    end = lower.find("</title", opened) if opened >= 0 else -1
    title = " ".join(html.unescape(page[opened + 1 : end]).split()) if end >= 0 else ""
    return title or " ".join(html.unescape(_without_markup(page, lower)).split())


def _without_markup(page: str, lower: str) -> str:
    """`page` with its tags, comments, scripts and styles left out (`lower`: the page in lower case)."""
    parts: list[str] = []
    at = 0
    while (tag := lower.find("<", at)) >= 0:
        parts.append(page[at:tag])
        name = next((n for n in UNSHOWN_ELEMENTS if lower.startswith(n, tag + 1)), None)
        if lower.startswith("<!--", tag):
            close, after = lower.find("-->", tag + 4), 3
        elif name is not None:
            close, after = lower.find(f"</{name}", tag), 0
        else:
            close, after = lower.find(">", tag), 1
        if close < 0:  # never closed: the rest is markup
            return " ".join(parts)
        at = close + after
    parts.append(page[at:])
    return " ".join(parts)


def without_status(text: str, status: int) -> str:
    """`text` without the first words when they repeat the status line (nginx's page is titled "502 Bad Gateway")."""
    for said in (_status_line(status), _status_line(status).partition(" ")[2], str(status)):
        if said and text.lower().startswith(said.lower()):
            return text[len(said) :].lstrip(" -–—:|.,")
    return text


def unshaped_body(body: bytes, status: int, content_type: str | None = None) -> str:
    """A body that is no error object (a proxy's page, plain text) as one line: an HTML page's title
    or text, plain text with its lines joined, without a repeat of the status line; escaped, cut."""
    text = body.decode("utf-8", errors="replace").strip()
    text = page_text(text) if is_html(text, content_type) else " ".join(text.split())
    return shorten(without_status(text, status), PAGE_CHARS)


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return str(status)


def page_note(body: bytes, content_type: str | None) -> str:
    """For an answer that should have been JSON or an event stream: what it is, when an HTML page
    (a web UI or a proxy's page at the address: its title says which)."""
    text = body[:PAGE_BYTES].decode("utf-8", errors="replace").strip()  # a title comes early
    if not is_html(text, content_type):
        return ""
    said = shorten(page_text(text), PAGE_CHARS)
    return f" (an HTML page: {said})" if said else " (an HTML page)"


def http_error(status: int, body: bytes, retry_after: str | None, location: str | None = None,
               advice: Advice = Advice(), model: str | None = None, content_type: str | None = None,
               requested: str | None = None) -> RemoteError:  # fmt: skip
    """One line for a non-200 answer: the status first, then the server's message, then a hint
    (a context overflow is its own line, context_refusal)
    (`advice`: the fixes a refused chat request can name, chat/advice.py; `model`: the model a
    chat request named, None for other requests; `requested`: the URL asked, which a redirect's
    Location is compared with). A body that is no OpenAI-style error (an HTML
    page, plain text) is shown by `unshaped_body`; with a 502-504 it is most likely a proxy's."""
    message = error_message(body)
    detail = message if message is not None else unshaped_body(body, status, content_type)
    who = "the server"
    if status in GATEWAY_HINTS and message is None:
        who, hint = "the server (or a proxy in front of it)", GATEWAY_HINTS[status]
    elif status in (400, 500) and NO_MEDIA.search(body.decode("utf-8", errors="replace")):
        hint = no_media_hint(advice)
    elif status == 503:  # the server's own: busy (serve past --max-connections), loading (llama.cpp), stopping
        hint = "the server cannot take requests now (busy, starting or stopping); try again later, or look at its log"
    elif status >= 500:
        hint = "the server failed; try again, or look at its log"
    elif 300 <= status < 400:  # redirects are never followed (they could lead anywhere, with the key)
        hint = redirect_hint(location, requested)
    elif status == 400 and CONTEXT_OVERFLOW.search(body.decode("utf-8", errors="replace")):
        said = error_message(body, with_kind=False) or unshaped_body(body, status, content_type)
        return ContextRefused(context_refusal(advice, said=said), said)  # RemoteConversation adds the limit
    elif status == 400 and TOO_MANY_MEDIA.search(body.decode("utf-8", errors="replace")):
        hint = too_many_media_hint(advice)
    elif status == 413:
        hint = too_large_hint(advice)
    elif status == 404 and model is not None and NAMES_A_MODEL.search(body.decode("utf-8", errors="replace")):
        hint = unknown_model_hint(model, advice)
    else:
        hint = _HINTS.get(status, "check the request")
    wait = wait_asked(retry_after) if status in (429, 503) else None
    if wait is not None:
        hint += f" (it asks to wait {wait})"
    said = f": {shorten(detail)}" if detail else ""
    return RemoteError(f"{who} answered {_status_line(status)}{said}; {hint}")


def redirect_hint(location: str | None, requested: str | None) -> str:
    """What to do about a redirect, by where it leads from the URL asked: the same host over
    https (a server that takes only TLS), another path there (--server is not the API root), or
    elsewhere."""
    where = f"it redirects to {shorten(location, 120)}, which" if location else "a redirect"
    try:
        asked = urlsplit(requested or "")
        target = urlsplit(urljoin(requested or "", location or ""))
        same_host = bool(location) and target.hostname == asked.hostname
        # the port each names, or its scheme's (.port raises ValueError for one out of range)
        asked_port, target_port = asked.port, target.port or WEB_SCHEMES.get(target.scheme)
    except ValueError:  # a Location that is no URL (an unclosed IPv6 bracket)
        same_host = False
    if same_host and asked.scheme == "http" and target.scheme == "https":
        # https:// put in --server keeps the port written there, else takes 443
        if target_port == (asked_port or 443):
            return f"{where} is not followed; use https:// in --server"
        return f"{where} is not followed; use https:// and port {target_port} in --server"
    if same_host and target.scheme == asked.scheme and target_port == (asked_port or WEB_SCHEMES.get(asked.scheme)):
        return f"{where} is not followed; check the path in --server (the API root, which usually ends in /v1)"
    return f"{where} is not followed; check --server"


def wait_asked(retry_after: str | None, now: float | None = None) -> str | None:
    """A Retry-After header (seconds, or an HTTP date) as a wait a person reads: "7 s", "2 minutes",
    "about 3 hours", "over a day" (a value that long is a broken server's); None for a value that is
    neither, or a date already past. Only the number is shown, never the server's text."""
    text = (retry_after or "").strip()
    if text.isascii() and text.isdigit():  # int() would refuse "²", and take 5000 digits slowly: cut first
        seconds = int(text) if len(text) <= 9 else 10**9
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": a date in UTC
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = math.ceil(when.timestamp() - (time.time() if now is None else now))
        if seconds <= 0:
            return None
    return human_wait(seconds)


def human_wait(seconds: int) -> str:
    """`seconds` rounded to the unit a person would say (3599 s is "about 1 hour", not "60 minutes")."""
    minutes, hours = round(seconds / 60), round(seconds / 3600)
    if seconds < 60:
        return f"{seconds} s"
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    if hours < 24:
        return f"about {hours} hour{'s' if hours != 1 else ''}"
    return "about a day" if seconds <= 86400 else "over a day"


def mib(limit: int) -> str:
    return f"{limit >> 20} MiB"


def reason(err: BaseException) -> str:
    """An exception's own words, shortened for an error line."""
    text = str(err) or type(err).__name__
    return shorten(text, 160)


# What can fail below HTTP: the connection, or the body's compression (DecodingError is no TransportError)
BROKEN = (httpx.TransportError, httpx.DecodingError)


def transport_error(err: httpx.TransportError | httpx.DecodingError, url: str, timeout: float, connect_s: float,
                    mid_answer: bool) -> RemoteError:  # fmt: skip
    """One line for a failure below HTTP: refused, reset, timed out, unreadable, not inflatable
    (`connect_s`: the connect timeout, at most `timeout`)."""
    if isinstance(err, httpx.DecodingError):
        return StreamFailed(f"the server's compressed answer does not inflate ({reason(err)})",
                            "check --server (or the proxy in front of it)")  # fmt: skip
    if isinstance(err, httpx.ConnectTimeout):
        return RemoteError(f"connecting to {url} timed out after {connect_s:g} s; check --server and the network")
    if isinstance(err, httpx.ConnectError):
        refused = tls_refusal(err, url)
        if refused is not None:
            return refused
        return RemoteError(f"cannot connect to {url} ({reason(err)}); is the server running? check --server")
    if isinstance(err, httpx.ReadTimeout):
        return StreamFailed(f"the server sent nothing for {timeout:g} s",
                            "it may be overloaded: try again, or raise [remote] timeout to wait longer")  # fmt: skip
    if isinstance(err, httpx.WriteTimeout):  # a server that stopped reading (its own error said "timed out")
        return RemoteError(f"the server took no more of the request for {timeout:g} s; it may be overloaded: "
                           "try again, or raise [remote] timeout to wait longer")  # fmt: skip
    if isinstance(err, httpx.TimeoutException):
        return StreamFailed(f"talking to {url} timed out ({reason(err)})", "try again")
    # mid-answer, RemoteConversation keeps the text that came before the break (`what` is its note)
    where = "in the middle of the answer" if mid_answer else "before the answer began"
    return StreamFailed(f"the connection to {url} broke {where} ({reason(err)})", "ask again")


def tls_refusal(err: httpx.TransportError, url: str) -> RemoteError | None:
    """The line for a TLS handshake with an https:// server that failed on the server's side (it
    speaks no TLS, or its certificate is not trusted); None for any other failure."""
    if not url.startswith("https:"):
        return None
    if NOT_TLS.search(str(err)):
        return RemoteError(f"cannot connect to {url}: the server does not speak TLS; use http:// in --server")
    if NOT_TRUSTED.search(str(err)):
        return RemoteError(f"cannot connect to {url}: its TLS certificate is not trusted ({reason(err)}); check the "
                           "host name in --server, or name the CA that signed it in SSL_CERT_FILE")  # fmt: skip
    return None


FIRST_LINE = re.compile(rb"[\r\n]*[^\r\n]*")


def not_http(url: str, err: httpx.RemoteProtocolError, proxy: str | None = None) -> RemoteError:
    """For an answer that is not HTTP: another protocol at the port (an SSH banner, TLS), said as
    soon as its first bytes come (NotHttpAnswer), or a head h11 could not parse (a broken one).
    `proxy`: the proxy the request went through, as a line names it, blamed when it answered so."""
    todo = "check --server (its port, and http:// or https://)"
    other = _cause(err, NotHttpAnswer)
    if other is not None:
        # its first line, with the line breaks before it (a stray CRLF before a status line), escaped
        began = FIRST_LINE.match(other.began).group().decode("utf-8", errors="replace")
        if other.to_proxy:  # the server was never reached
            return RemoteError(f"{proxy or 'the proxy'} does not speak HTTP (it began with: {shorten(began, 60)}); "
                               "check its URL (its port), or add the server's host to NO_PROXY")  # fmt: skip
        return RemoteError(f"what answers at {url} is not an HTTP server (it began with: {shorten(began, 60)}); {todo}")
    return RemoteError(f"the answer of {url} is not valid HTTP ({reason(err)}); {todo}")


def unparsable(err: BaseException) -> bool:
    """Whether what the server sent is not HTTP (a server that hung up is httpcore's own error)."""
    return _cause(err, h11.RemoteProtocolError) is not None or _cause(err, NotHttpAnswer) is not None


def _cause(err: BaseException, kind: type[E]) -> E | None:
    """`err` or the error under it of type `kind` (httpx's error, httpcore's, h11's), or None."""
    seen: BaseException | None = err
    for _ in range(16):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def head_late(timeout: float) -> RemoteError:
    return RemoteError(
        f"the server took over {timeout:g} s to send the head of its answer; it may be overloaded: try again, "
        "or raise [remote] timeout to wait longer"
    )
