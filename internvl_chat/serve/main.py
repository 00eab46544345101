"""`internvl-chat serve`: flags → settings → model → engine thread → uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from functools import cache

from ..demo import embedded_model_argument
from ..errors import OneLineParser, UsageError
from ..files import OutputFailed, expand_home, visible, visible_lines
from ..numbers import counted
from ..setting_flags import SettingFlags, add_engine_flags, add_setting_flag, add_setting_switch

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="internvl-chat serve",
        description="Serve a checkpoint over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health; "
        "vLLM's /tokenize, /detokenize and /tokenizer_info).",
        epilog="Defaults come from the config file's [serve] and [model] sections (what a request leaves unset: "
        "[generation], [media], [system]); flags win. Only data: URLs are read "
        "unless --allow-remote-media / --allow-local-media say otherwise.",
    )
    add_setting_flag(p, "--model", setting="model.path", metavar="DIR",
                     help="checkpoint folder (required unless model.path is set in the config)")
    add_setting_flag(p, "--host", setting="serve.host", metavar="ADDR",
                     help="address to bind (default 127.0.0.1: this machine only)")
    add_setting_flag(p, "--port", setting="serve.port", type=int, metavar="N",
                     help="port (default 8000; 0 picks a free one)")
    add_setting_flag(p, "--api-key", setting="serve.api_key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' (or set INTERNVL_CHAT_SERVE_API_KEY)")
    add_setting_flag(p, "--model-id", setting="serve.model_id", metavar="NAME",
                     help="model name clients use (default: the checkpoint folder's name)")
    add_setting_flag(p, "--slots", setting="serve.slots", type=int, metavar="N",
                     help="conversations kept in KV caches for prefix reuse (default 2)")
    add_setting_flag(p, "--queue-depth", setting="serve.queue_depth", type=int, metavar="N",
                     help="requests waiting behind the running one before 429 (default 8)")
    add_setting_switch(p, "--allow-remote-media", setting="serve.allow_remote_media", value=True, default=None,
                       help="let requests make the server fetch http(s) image/video URLs, from any address this machine "
                       "reaches (its own and its network's included: for trusted clients only; a redirect from https to "
                       "plain http is refused)")  # fmt: skip
    add_setting_switch(p, "--no-shared-cache", setting="serve.shared_cache", value=False, default=None,
                       help="let no request reuse what another one cached (prompt prefix, image and video features, "
                       "answers): cached_tokens says nothing about other clients' requests, whatever cache_salt they "
                       "send; every request is prefilled whole")  # fmt: skip
    add_setting_flag(p, "--allow-local-media", setting="serve.allow_local_media", metavar="DIR",
                     help="let requests read files inside DIR via file:// URLs")
    add_setting_flag(p, "--allow-origin", setting="serve.allow_origins", action="append", metavar="ORIGIN",
                     help="let web pages from ORIGIN (e.g. http://localhost:3000) call the server from a browser "
                     "(CORS; none may by default); repeat it for more; * allows every page and needs --api-key")  # fmt: skip
    add_setting_flag(p, "--max-video-decode-megapixels", setting="serve.max_video_decode_megapixels", type=int, metavar="N",
                     help="megapixels of frames the decoding of a request's video files may produce in all, those decoded to "
                     "reach the sampled ones included; a request over it gets 400 (default 20000: about 5 minutes of 1080p; "
                     "0: no limit)")  # fmt: skip
    add_setting_flag(p, "--max-logprobs-mb", setting="serve.max_logprobs_mb", type=int, metavar="N",
                     help="MiB the logprobs of a non-streamed request may take in the server's memory at worst "
                     "(n × the answer's most tokens, max_tokens or else the default answer length, × (top_logprobs + 1), "
                     "and an echoed prompt's); one over it gets 400 before it is queued (default 1024; 0: no limit; a stream's "
                     "logprobs are sent as they come)")  # fmt: skip
    add_setting_flag(p, "--max-connections", setting="serve.max_connections", type=int, metavar="N",
                     help="open connections served at once; a request on one more gets 503 (default 100)")
    add_setting_flag(p, "--header-timeout", setting="serve.header_timeout", type=float, metavar="S",
                     help="seconds a client has to send a request's line and headers, else 408 (default 10)")
    add_setting_flag(p, "--body-timeout", setting="serve.body_timeout", type=float, metavar="S",
                     help="seconds a client has to send a whole request body, else 408 (default 60)")
    add_setting_flag(p, "--write-timeout", setting="serve.write_timeout", type=float, metavar="S",
                     help="seconds a client may read none of its answer (its TCP window full) before it is "
                     "dropped and its generation cancelled; nor may more than 32 MiB of it wait unsent (a stream's "
                     "at any moment, an answer written whole at the end of such a span) (default 60)")  # fmt: skip
    add_setting_flag(p, "--keep-alive-timeout", setting="serve.keep_alive_timeout", type=float, metavar="S",
                     help="seconds an idle connection stays open between requests (default 5)")
    add_setting_flag(p, "--max-header-kb", setting="serve.max_header_kb", type=int, metavar="N",
                     help="KiB a request line and headers may fill before they are complete, else 400 (default 16)")
    add_engine_flags(p, "KV cache length per slot in tokens")
    p.add_argument("--config", metavar="FILE",
                   help="settings file (default: $INTERNVL_CHAT_CONFIG, else ~/.config/internvl-chat/config.toml; $XDG_CONFIG_HOME replaces ~/.config)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info; the access log, on stdout, is info: warning leaves it out)")
    return p


@cache
def serve_setting_flags() -> SettingFlags:
    """serve's flags that give settings (a parser of its own: nothing parses with it)."""
    return SettingFlags(build_parser())


def _overrides(args: argparse.Namespace) -> dict:
    """setting → the value its flag gave (None: not given)."""
    return serve_setting_flags().overrides(args)


def main(argv: list[str], exiting: bool = False) -> int:
    """`exiting`: the process ends when this returns (the `internvl-chat serve` command; see `serve`)."""
    from ..settings import load_settings

    args = build_parser().parse_args(argv)
    if args.config is not None and not args.config.strip():  # it named the working folder: "config file . is a folder"
        raise UsageError("--config was given an empty path; pass the path of a file")
    # a bad value's message names the flag as typed ("--slots: must be …", not the setting "serve.slots")
    settings = load_settings(args.config, os.environ, _overrides(args), serve_setting_flags().names())
    if not settings.model.path:
        raise UsageError(f"serve needs a model: pass --model DIR (e.g. --model {embedded_model_argument()})")
    return serve(settings, log_level=args.log_level, exiting=exiting)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Terminated(BaseException):
    """SIGTERM (`kill`, a service manager) or SIGHUP while the model loads, raised where the
    program is; not an Exception, so no `except Exception` on the way swallows it."""


def _terminate(signum: int, frame) -> None:
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the clean-up short
        signal.signal(stop_signal, signal.SIG_IGN)
    raise _Terminated


class _StopRequest:
    """Once the model has loaded, Ctrl-C, SIGTERM and SIGHUP only ask the server to stop.

    Raising where the program happens to be (starting the engine thread, inside the event loop
    before uvicorn has put its own handlers in place, or as uvicorn raises the signal again after
    its graceful shutdown) made the outcome depend on the moment the signal came; a flag makes
    every moment end the same way: uvicorn's shutdown if it has started, then ours.
    """

    def __init__(self, server):
        self.server = server
        self.requested = False

    def __call__(self, signum: int, frame) -> None:
        if self.requested:  # a second one: uvicorn says "CTRL+C to force quit" while it waits
            self.server.hurry()
        self.requested = True
        self.server.should_exit = True  # what uvicorn's own handler sets (SIGHUP: it has none)

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup`: SIGHUP stays ignored
                signal.signal(signum, self)


def serve(settings, log_level: str = "info", exiting: bool = False) -> int:
    """Serve until Ctrl-C, SIGTERM or SIGHUP; each ends with status 0 and one "stopped" line.

    While the model loads, SIGTERM and SIGHUP end the load quietly (Ctrl-C is "interrupted", as
    elsewhere in the app). Then they only ask for a stop (_StopRequest): uvicorn stops taking
    connections and lets running requests end, cancelling them after 5 s; SIGTERM's and SIGHUP's
    defaults would kill the process (status -15 or -1). A SIGHUP that was ignored when we started
    (`nohup`) stays ignored. The handlers found at the start are put back at the end, but where a
    stop signal ended the server and the process ends now (`exiting`: the command), a default one
    (SIG_DFL, Python's KeyboardInterrupt) is put back ignored (`_after_stop`). A caller that goes on
    (a test, a program serving in-process) gets its own handlers back: it was left with Ctrl-C and
    SIGTERM ignored for the rest of its run.
    """
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, _terminate)
    signalled = False
    try:
        signalled = _serve(settings, log_level)
        return 0
    except _Terminated:
        signalled = True
        print("internvl-chat serve: stopped", file=sys.stderr)
        return 0
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(signum, _after_stop(signum, handler) if signalled and exiting else handler)


def _after_stop(signum: int, handler):
    """The handler to put back for `signum` once a stop signal has ended the server: the process is
    ending then (the interpreter's teardown takes most of a second after "stopped"), and one more
    Ctrl-C or SIGTERM meanwhile, under the defaults, killed it (status -2 or -15, where the stop it
    had asked for ends with 0): a default handler is put back ignored, any other as it was."""
    if handler is signal.SIG_DFL or (signum == signal.SIGINT and handler is signal.default_int_handler):
        return signal.SIG_IGN
    return handler


def uvicorn_config(app, options, log_level: str, graceful_s: int = 5):
    """uvicorn's settings for the app: the h11 protocol with our deadlines (always h11, even where
    httptools is installed), the connection limit, keep-alive and head size."""
    import uvicorn

    from .connections import ConnectionLimit, bounded_h11

    # instead of uvicorn's limit_concurrency: a JSON 503, with CORS headers for an allowed page's
    limit = ConnectionLimit(app, options.max_connections, options.allow_origins)
    return uvicorn.Config(
        limit, log_level=log_level, timeout_graceful_shutdown=graceful_s,
        http=bounded_h11(options.header_timeout, options.body_timeout, limit, options.write_timeout),
        # the API has no WebSocket endpoint, and an upgraded connection would leave our protocol
        # without closing it (the limit would count it for ever)
        ws="none",
        timeout_keep_alive=options.keep_alive_timeout,  # type: ignore[arg-type] # call_later takes a float
        h11_max_incomplete_event_size=options.max_header_bytes,
    )  # fmt: skip


BACKSTOP_S = 5


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, whose graceful shutdown ends the requests itself (`end_requests`: the
        engine's jobs, bodies still coming) when the grace period is over: each client then gets a
        503 (a stream: an error event and `[DONE]`).

        uvicorn's own end of the grace period cancels the handlers' tasks: a stream was cut
        mid-chunk, a non-streamed request got a text/plain 500, and the log a traceback per
        request. Its deadline is moved BACKSTOP_S later and stays as a backstop.
        """

        def __init__(self, config, end_requests) -> None:
            super().__init__(config)
            self.end_requests = end_requests
            self.grace_s = config.timeout_graceful_shutdown
            config.timeout_graceful_shutdown = self.grace_s + BACKSTOP_S
            self._loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn's handler while it runs: a second Ctrl-C set force_exit, which stopped the
            # wait and left the handlers to be cancelled as the loop closed (cut streams, 500s)
            if self.should_exit:
                self._captured_signals.append(sig)  # raised again after the run, under _StopRequest
                self.hurry()
                return
            super().handle_exit(sig, frame)

        def hurry(self) -> None:
            """A second stop signal: the running requests end now (a signal handler: only schedules).
            Once uvicorn has shut down (its loop closed) there are none: the engine thread's job,
            if one runs still, was cancelled as the worker stops (it raised "Event loop is closed",
            a traceback and status 1, as `serve` waited for the engine thread)."""
            self.grace_s = 0
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    self._loop.call_soon_threadsafe(self.end_requests)

        async def shutdown(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            end = self._loop.call_later(self.grace_s, self.end_requests)
            try:
                await super().shutdown(sockets)
            finally:
                end.cancel()

    return GracefulServer


def GracefulServer(config, end_requests):  # noqa: N802 - uvicorn is imported only when serving
    return _graceful_server_class()(config, end_requests)


def _serve(settings, log_level: str) -> bool:
    """Serve until a stop signal (True) or until uvicorn ends on its own (False: it could not start)."""
    import uvicorn

    from ..engine.config import refuse_web_model
    from ..engine.loader import load_model
    from .app import create_app
    from .engine import EngineWorker
    from .options import ServeOptions

    options = ServeOptions.from_settings(settings)
    if options.allow_remote_media:  # a proxy httpx cannot use is said now, not as every fetch fails
        from .. import proxy_env

        proxy_env.check()
    refuse_web_model(settings.model.path)
    path = expand_home(settings.model.path)
    # bound before the model loads: a port in use (another server on it) or a host that cannot be
    # bound is said at once, not after a load of minutes; it listens once the model is ready
    sock = bind_socket(options.host, options.port)
    try:
        loaded = load_model(path, settings.model.device, settings.model.dtype, settings.model.max_context,
                            settings.model.int4_backend, compile=settings.model.compile,
                            fit_context=settings.is_default("model.max_context"))  # fmt: skip
        model_id = options.model_id or path.resolve().name
        worker = EngineWorker(loaded, options)
        # from here the worker holds a temp folder for media: stopping it removes that, also when the
        # socket cannot listen (each failed start left an empty /tmp/internvl-chat-serve-* behind)
        try:
            app = create_app(worker, model_id)
            config = uvicorn_config(app, options, log_level)
            escape_logged_requests()  # after Config: it sets up uvicorn's log handlers
            def end_requests() -> None:
                worker.end_jobs()
                app.state.ending.set()  # bodies still being received
                config.app.hurry_readers()  # answers their clients do not read (config.app: the ConnectionLimit)

            server = GracefulServer(config, end_requests)
            stop = _StopRequest(server)
            stop.install()  # before the address is printed: whoever reads it may signal at once
            start_listening(sock, options.host, options.port)
            port = sock.getsockname()[1]
            host = f"[{options.host}]" if ":" in options.host else options.host
            warn = ""
            if options.host not in LOOPBACK and not options.api_key:
                warn = " (reachable from the network without an API key: set --api-key)"
            print(f"internvl-chat serve: {visible(model_id)} on http://{host}:{port}/v1 · {counted(options.slots, 'slot')} of "
                  f"{loaded.model.max_seq_len:,} tokens ({worker.slots.kv_bytes / 2**20:,.1f} MiB KV) · queue "
                  f"{options.queue_depth}{warn}", file=sys.stderr, flush=True)  # fmt: skip
            show_server_log(log_level)
            worker.start()
            if not stop.requested:
                # uvicorn puts its own Ctrl-C/SIGTERM handlers in while it runs and raises a signal
                # it handled again once it has shut down: under ours then, which only sets the flag
                server.run(sockets=[sock])
        finally:
            worker.stop()
    finally:
        sock.close()
    print("internvl-chat serve: stopped", file=sys.stderr)
    return stop.requested


# A record's lines after its first (a traceback, a client's text with newlines) start under its
# message, past uvicorn's `LEVEL:    ` prefix: only a record's first line starts at the left edge.
CONTINUATION = " " * 10
# line breaks `visible_lines` leaves, for tools that split lines as Python does (it escapes the others)
_LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})


def _log_text(text: str, one_line: bool = False) -> str:
    text = visible(text) if one_line else visible_lines(text)
    return text.translate(_LINE_SEPARATORS).replace("\n", "\n" + CONTINUATION)


class _EscapeControls(logging.Filter):
    """Log records with control, escape and bidi characters made visible, and their continuation
    lines indented.

    uvicorn's access log prints the client address, which it takes from X-Forwarded-For when the
    peer is 127.0.0.1, and a traceback may quote request text: a client must not be able to send
    escape sequences to the server's terminal, nor a newline and a line that reads as a record of
    its own (a forged access-log line). Arguments are escaped one by one, so the colours uvicorn
    adds when it formats the line stay; with `one_line_args` (the access log: an address, a path)
    each is kept to one line, its newlines escaped too.
    """

    def __init__(self, one_line_args: bool = False) -> None:
        super().__init__()
        self.one_line_args = one_line_args

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "internvl_escaped", False):  # a logger's filter and its handler's both see it
            return True
        record.internvl_escaped = True
        record.msg = _log_text(str(record.msg))  # an exception logged as the message too
        if isinstance(record.args, tuple):  # numbers stay numbers, for %d; anything else is text
            record.args = tuple(a if isinstance(a, (int, float)) else _log_text(str(a), self.one_line_args)
                                for a in record.args)  # fmt: skip
        if record.exc_info and not record.exc_text:
            record.exc_text = CONTINUATION + _log_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = CONTINUATION + _log_text(record.stack_info)
        return True


_ESCAPE = _EscapeControls()
_ESCAPE_ACCESS = _EscapeControls(one_line_args=True)


def escape_logged_requests() -> None:
    """Escape what the server's loggers print (their handlers catch records of child loggers too),
    and stop writing to a stream that was closed."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "internvl_chat.serve"):
        logger = logging.getLogger(name)
        escape = _ESCAPE_ACCESS if name == "uvicorn.access" else _ESCAPE
        for target in (logger, *logger.handlers):
            if escape not in target.filters:
                target.addFilter(escape)
        for handler in logger.handlers:
            _drop_when_closed(logger, handler)


def _drop_when_closed(logger: logging.Logger, handler: logging.Handler) -> None:
    """A handler whose stream fails (stdout, where uvicorn writes its access log, piped into a
    reader that left: `serve | head`) is taken off its logger; logging printed a traceback of
    some 40 lines on stderr for every request instead."""
    report = handler.handleError
    if getattr(report, "drops_handler", False):
        return

    def handle_error(record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], (OSError, OutputFailed)):  # a closed pipe, a full disk: no bug of ours
            logger.removeHandler(handler)
        else:
            report(record)

    handle_error.drops_handler = True  # type: ignore[attr-defined]
    handler.handleError = handle_error  # type: ignore[method-assign]


def show_server_log(log_level: str) -> None:
    """Our own log lines (a connection dropped at --write-timeout, one closed at --header-timeout,
    one refused at --max-connections) on stderr as uvicorn prints its own, `INFO:     …`.

    With no handler, they went to Python's last-resort handler, which prints warnings and worse
    only: --log-level info or debug showed none of the others, and warnings had no level."""
    from uvicorn.logging import DefaultFormatter

    logger = logging.getLogger("internvl_chat.serve")
    logger.setLevel(log_level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        handler.addFilter(_ESCAPE)
        _drop_when_closed(logger, handler)
        logger.addHandler(handler)
    logger.propagate = False


LISTEN_BACKLOG = 2048  # uvicorn's own default


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket whose connections send small writes at once (TCP_NODELAY):
    `bind_socket`, then `start_listening`."""
    return start_listening(bind_socket(host, port), host, port)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not listening yet, whose connections will send small
    writes at once (TCP_NODELAY).

    `serve` binds before it loads the model, so a port in use, one it may not take or a host it
    cannot bind is said at once, not after a load of minutes; while it is bound but not listening,
    a client that connects is refused, as when nothing was bound. It is bound without
    SO_REUSEADDR where it can be: Linux lets two SO_REUSEADDR sockets share a port while neither
    listens, so a second server started during the load bound it too and the later of the two to
    load failed then; without it, the port is held alone until it listens (`start_listening` sets
    it then, so the connections it leaves in TIME_WAIT do not keep the next start off the port).
    Only where the port is taken (a previous run's connections in TIME_WAIT, mostly) is it bound
    with SO_REUSEADDR, as before, and shared until it listens.

    A response is written in pieces (headers, then body or SSE events). With Nagle's algorithm
    on, a piece waits for the ACK of the previous one, which the client delays by 40 ms on a
    kept-alive connection. asyncio turns Nagle off only for sockets whose protocol number is
    IPPROTO_TCP, and `socket.socket(AF_INET)` leaves it 0, so the protocol is set explicitly and
    TCP_NODELAY is set on the listener too (Linux passes it on to accepted sockets).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host") from None
    except UnicodeError:  # the IDNA codec refuses the name (an empty label, one over 63 characters)
        raise UsageError(f"cannot listen on {host}:{port} (not a valid host name); check --host") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            # a previous run's connections in TIME_WAIT (or a socket bound, not listening)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        sock.close()
        raise _cannot_listen(host, port, e) from None
    return sock


def start_listening(sock: socket.socket, host: str, port: int) -> socket.socket:
    """`sock` (from `bind_socket`) listening, with SO_REUSEADDR; closed, and a UsageError, where it
    cannot (bound with SO_REUSEADDR beside a previous run's TIME_WAIT connections, it shared the
    port, and another server bound it meanwhile and listened first).

    It listens before `serve` prints its address: a client that connects at once then waits in
    the backlog until uvicorn accepts, instead of being refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise _cannot_listen(host, port, e) from None
    return sock


def _cannot_listen(host: str, port: int, e: OSError) -> UsageError:
    if e.errno == errno.EACCES and 0 < port < 1024:
        return UsageError(f"cannot listen on {host}:{port} ({e.strerror}): ports below 1024 need root or "
                          "CAP_NET_BIND_SERVICE; choose a --port from 1024 up")  # fmt: skip
    return UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host")
