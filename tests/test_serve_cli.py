"""`internvl-chat serve` as a user starts it: a subprocess on a free port, bearer key, clean Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import openai
import ptyprocess
import pytest

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 120


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}


@contextlib.contextmanager
def _serving(model: Path, *flags: str, with_stdout: bool = False, python: list[str] | None = None,
             stdout_to: Path | None = None):  # fmt: skip
    """`internvl-chat serve` on a free port in a subprocess (run by `python`, default this
    interpreter); yields (proc, lines): a queue of its stderr lines (and stdout's: uvicorn writes
    its access log there), read by a thread, then None when the stream ends. `stdout_to`: a file
    for stdout alone."""
    stdout = stdout_to.open("w") if stdout_to else subprocess.PIPE if with_stdout else subprocess.DEVNULL
    proc = subprocess.Popen(
        [*(python or [sys.executable]), "-m", "internvl_chat.cli", "serve", "--model", str(model), "--port", "0",
         "--device", "cpu", "--dtype", "float32", *flags],
        stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.STDOUT if with_stdout else subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    stream = proc.stdout if with_stdout else proc.stderr

    def read() -> None:
        with stream:  # closed at its end (left to the garbage collector: a ResourceWarning in a later test)
            for line in stream:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if stdout_to:
            stdout.close()


def _next_match(lines: queue.Queue[str | None], pattern: str) -> tuple[re.Match, str]:
    while True:
        line = lines.get(timeout=WAIT_S)
        assert line is not None, f"the server's output ended before a line matching {pattern!r}"
        if found := re.search(pattern, line):
            return found, line


def _drain(lines: queue.Queue[str | None]) -> list[str]:
    """What the server printed after the lines already read, up to the end of its output."""
    said = []
    while (line := lines.get(timeout=WAIT_S)) is not None:
        said.append(line)
    return said


def test_serve_subcommand_serves_with_a_key_and_stops_on_ctrl_c(tiny_original):
    flags = ("--api-key", "k3y", "--max-context", "2048", "--log-level", "warning")
    with _serving(tiny_original, *flags) as (proc, lines):
        found, line = _next_match(lines, r"on (http://127\.0\.0\.1:\d+/v1)")
        url = found.group(1)
        assert "2,048 tokens" in line and "network" not in line  # bound to loopback: no warning

        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=WAIT_S)
        model = client.models.list().data[0].id
        assert model == tiny_original.name
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0


def test_serve_without_a_model_says_what_to_do():
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "serve"], capture_output=True, text=True,
                         env=_env(), timeout=WAIT_S, stdin=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["internvl-chat: error: serve needs a model: pass --model DIR "
                                               "(e.g. --model internvl_chat/demo_model)"]  # fmt: skip


def test_serve_without_a_model_names_a_folder_that_is_there_from_any_working_folder(tmp_path):
    # an installed package (pip install .) is run from anywhere but the checkout: the example said
    # `--model internvl_chat/demo_model`, a folder that exists only in the repository's root
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "serve"], capture_output=True, text=True,
                         env=_env(), timeout=WAIT_S, stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2
    example = re.fullmatch(r"internvl-chat: error: serve needs a model: pass --model DIR \(e\.g\. --model (.+)\)",
                           run.stderr.strip())  # fmt: skip
    assert example, run.stderr
    (folder,) = shlex.split(example[1])  # quoted for a shell where the checkout's path needs it (a space)
    assert (tmp_path / folder / "config.json").is_file(), example[1]
    assert Path(folder).is_absolute()



def test_an_empty_config_path_is_refused_as_the_chat_app_refuses_it():
    # it named the working folder: "config file . is a folder, not a file"
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "serve", "--config", ""], capture_output=True,
                         text=True, env=_env(), timeout=WAIT_S, stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["internvl-chat: error: --config was given an empty path; pass the path of a file"]


def test_a_port_in_use_is_a_one_line_error_that_leaves_no_temp_folder(tiny_original, tmp_path):
    """The media temp folder is made with the engine, before the port is bound: each start on a
    taken port left an empty internvl-chat-serve-* folder in the temp dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = subprocess.run(
            [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(tiny_original), "--port", port,
             "--device", "cpu", "--dtype", "float32", "--max-context", "2048"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env={**_env(), "TMPDIR": str(temp)}, timeout=WAIT_S,
        )  # fmt: skip
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and list(temp.iterdir()) == []

def test_a_sigterm_as_the_engine_starts_leaves_no_temp_folder(tiny_original, tmp_path, monkeypatch, capsys):
    """The engine makes its media temp folder, then warms the tokenizer and its token pieces up
    (seconds for a large vocabulary): a SIGTERM meanwhile ended the start with "stopped" and left an
    internvl-chat-serve-* folder behind, the worker being not yet made for anything to stop it. The
    signal is sent from inside that step, so it lands there on any machine."""
    import tempfile

    from internvl_chat.serve import engine as serve_engine
    from internvl_chat.serve.main import main

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    made = []

    def pieces_interrupted(tokenizer):
        made.extend(temp.iterdir())  # the media folder exists by now
        signal.raise_signal(signal.SIGTERM)  # its handler raises here, in the main thread
        pytest.fail("SIGTERM did not stop the start")

    monkeypatch.setattr(serve_engine, "TokenPieces", pieces_interrupted)
    argv = ["--model", str(tiny_original), "--port", "0", "--config", os.devnull, "--device", "cpu", "--dtype", "float32",
            "--max-context", "2048"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == "internvl-chat serve: stopped"
    assert made and list(temp.iterdir()) == [], made


@pytest.mark.parametrize("taken", ["port", "host"])
def test_a_port_in_use_or_a_bad_host_is_said_before_the_model_loads(tiny_original, monkeypatch, taken):
    """The port was bound only after the model had loaded: a second server on a taken port (or a
    --host that cannot be bound) said so after a load of minutes for a large checkpoint."""
    from internvl_chat.engine import loader
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import main

    loads = []
    monkeypatch.setattr(loader, "load_model", lambda *a, **kw: loads.append(a) or pytest.fail("the model was loaded"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = str(other.getsockname()[1])
        host = "127.0.0.1" if taken == "port" else "bad..host"
        argv = ["--model", str(tiny_original), "--port", port, "--host", host, "--config", os.devnull, "--device", "cpu"]
        with pytest.raises(UsageError, match=f"cannot listen on {re.escape(host)}:{port}"):
            main(argv)
    assert loads == []


@pytest.mark.parametrize("host", ["bad..host", "a" * 64 + ".example", "x" * 300, "\udcff"])
def test_a_host_name_the_resolver_cannot_encode_is_a_one_line_error(host):
    """An empty label, one over 63 characters, or an undecodable byte made the IDNA codec raise
    UnicodeError, which ended `serve` in a traceback (after the model had loaded)."""
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import listen_socket

    with pytest.raises(UsageError, match=r"\(not a valid host name\); check --host"):
        listen_socket(host, 0)


def test_a_privileged_port_without_permission_says_which_ports_are_free_to_use(monkeypatch):
    """A port below 1024 without root got "(Permission denied); choose another --port or --host",
    which does not say why, nor which ports would do."""
    import errno

    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import listen_socket

    class Unprivileged(socket.socket):
        def bind(self, address):
            if 0 < address[1] < 1024:
                raise PermissionError(errno.EACCES, "Permission denied")
            super().bind(address)

    monkeypatch.setattr(socket, "socket", Unprivileged)
    with pytest.raises(UsageError, match=r"127\.0\.0\.1:80 \(Permission denied\): ports below 1024 need root or "
                       r"CAP_NET_BIND_SERVICE; choose a --port from 1024 up"):  # fmt: skip
        listen_socket("127.0.0.1", 80)
    listen_socket("127.0.0.1", 0).close()


def test_serve_compile_flag_reaches_the_model_settings():
    """`serve --compile MODE` sets model.compile, which serve() passes to load_model; a bad mode is refused."""
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.settings import load_settings

    args = build_parser().parse_args(["--model", "m", "--compile", "on"])
    assert load_settings(os.devnull, {}, _overrides(args)).model.compile == "on"
    with pytest.raises(UsageError):
        load_settings(os.devnull, {}, _overrides(build_parser().parse_args(["--compile", "sometimes"])))


@pytest.mark.parametrize("flag", ["--model", "--allow-local-media"])
def test_an_unknown_users_home_is_a_one_line_error(tiny_original, flag):
    """`~nosuchuser/…` used to end in Path.expanduser's RuntimeError traceback."""
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import main

    argv = ["--config", os.devnull, "--model", str(tiny_original), flag, "~internvl-chat-no-such-user/x"]
    with pytest.raises(UsageError, match="there is no user 'internvl-chat-no-such-user'"):
        main(argv)


def test_request_text_in_the_server_log_is_escaped(tiny_original):
    # uvicorn takes the client address from X-Forwarded-For when the peer is 127.0.0.1 and logs it:
    # a local client could send terminal control sequences (here: set the window title, turn text red).
    # uvicorn writes its access log to stdout, the rest to stderr: both are read here
    with _serving(tiny_original, "--max-context", "256", "--log-level", "info", with_stdout=True) as (proc, lines):
        port = int(_next_match(lines, r"on http://127\.0\.0\.1:(\d+)/v1")[0].group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: \x1b]0;pwned\x07\x1b[31mEVIL\r\n"
                         b"Connection: close\r\n\r\n")  # fmt: skip
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        line = _next_match(lines, "GET /health")[1]
        assert "EVIL" in line and "\x1b" not in line and "\x07" not in line, line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0



FORGED = '127.0.0.1:6 - "POST /v1/chat/completions HTTP/1.1" 200 OK'


def _log_lines(emit) -> list[str]:
    """What `emit(logger, access_logger)` prints through the server's formatters (uvicorn's) and its
    escaping filter, set on the logger and on its handler as `serve` sets it."""
    from uvicorn.logging import AccessFormatter, DefaultFormatter

    from internvl_chat.serve.main import _ESCAPE, _ESCAPE_ACCESS

    stream = io.StringIO()
    loggers = []
    access_format = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    for name, formatter, escape in [
        ("test.serve-log", DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False), _ESCAPE),
        ("test.serve-log.access", AccessFormatter(access_format, use_colors=False), _ESCAPE_ACCESS),
    ]:
        logger = logging.getLogger(name)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(escape)
        logger.addFilter(escape)
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        loggers.append((logger, handler, escape))
    try:
        emit(*(logger for logger, _, _ in loggers))
    finally:
        for logger, handler, escape in loggers:
            logger.removeHandler(handler)
            logger.removeFilter(escape)
    return stream.getvalue().splitlines()  # as a log reader splits them: \u2028 and \x85 too


def test_text_with_line_breaks_in_the_server_log_cannot_forge_a_line():
    """A traceback (or an argument) quoting a client's text with a newline printed that text as a
    line of its own: a fake access-log line. Now only a record's first line starts at the left edge."""

    def emit(log, access):
        try:
            raise ValueError(f"bad field '\n{FORGED}'")
        except ValueError:
            log.error("request failed:\n%s", traceback.format_exc())  # as serve/engine.py logs one
            log.exception("failed")  # as uvicorn logs an exception in the app
        log.warning("from the client: %s", f"a\n{FORGED}\rb\u2028{FORGED}\x85{FORGED}")
        log.warning(ValueError(f"not a string\n{FORGED}"))
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", f"/x\n{FORGED}", "1.1", 404)

    lines = _log_lines(emit)
    records = [line for line in lines if line and not line[0].isspace()]
    assert [line.split()[0] for line in records] == ["ERROR:", "ERROR:", "WARNING:", "WARNING:", "INFO:"], lines
    # an access-log line stays one line, its newline escaped
    assert records[-1] == 'INFO:     127.0.0.1:5 - "GET /x\\n' + FORGED + ' HTTP/1.1" 404 Not Found', records[-1]
    forged = [line for line in lines[:-1] if FORGED in line]
    assert len(forged) == 4 and all(line.startswith(" " * 10 + FORGED) for line in forged), lines
    assert "\\u2028" in forged[2] and "\\x85" in forged[2]  # line breaks of other tools: escaped
    assert not any(line.startswith(" " * 20) for line in lines), lines  # indented once, by the logger's and the handler's filter


@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_access_log_is_on_stdout_the_rest_on_stderr_and_warning_leaves_it_out(tiny_original, tmp_path, level):
    """What README says of the two logs: a switch for the access log alone there is not."""
    out = tmp_path / "stdout"
    with _serving(tiny_original, "--max-context", "256", "--log-level", level, stdout_to=out) as (proc, lines):
        url = _next_match(lines, r"on (http://127\.0\.0\.1:\d+)/v1")[0].group(1)
        assert urllib.request.urlopen(f"{url}/health", timeout=WAIT_S).status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
        stderr = _drain(lines)
    access = out.read_text().splitlines()
    if level == "info":
        assert len(access) == 1 and access[0].startswith("INFO:     127.0.0.1:") and '"GET /health HTTP/1.1" 200' in access[0]
        assert "INFO:     Shutting down\n" in stderr and not any("/health" in line for line in stderr), stderr
    else:
        assert access == [] and stderr == ["internvl-chat serve: stopped\n"], (access, stderr)


def test_a_model_folder_name_is_shown_escaped_at_start(tiny_original, tmp_path):
    # the model id is the folder's name: an unpacked archive can name it with terminal controls
    folder = tmp_path / "tiny\x1b]0;pwned\x07\x1b[31m"
    shutil.copytree(tiny_original, folder)
    with _serving(folder, "--max-context", "256") as (proc, lines):
        line = _next_match(lines, r"on http://127\.0\.0\.1:\d+/v1")[1]
        assert line.startswith("internvl-chat serve: tiny\\e]0;pwned\\x07\\e[31m on "), line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0


STOP_SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])


@STOP_SIGNALS
def test_a_stop_signal_stops_the_server_gracefully_with_status_0(tiny_original, sig):
    """`kill PID` (a service manager's stop) used to end the process with status -15 after
    uvicorn's graceful shutdown, which re-raised the signal under the default handler; SIGHUP (the
    terminal closed) killed it at once (status -1): uvicorn does not handle it."""
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning") as (proc, lines):
        url = _next_match(lines, r"on (http://127\.0\.0\.1:\d+/v1)")[0].group(1)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=WAIT_S)
        stream = client.chat.completions.create(model=tiny_original.name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=1500, stream=True)  # fmt: skip
        next(iter(stream))  # a request in flight
        proc.send_signal(sig)
        with contextlib.suppress(openai.APIError):  # it ends, or is cut after the grace period
            for _ in stream:
                pass
        code = proc.wait(WAIT_S)
        rest = _drain(lines)
        assert code == 0 and "internvl-chat serve: stopped\n" in rest, (code, rest)
        assert not any("Traceback" in line for line in rest), rest


@STOP_SIGNALS
def test_a_stop_signal_before_serving_stops_quietly_with_status_0(tiny_original, sig):
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning") as (proc, lines):
        _next_match(lines, r"on http://127\.0\.0\.1:\d+/v1")  # before or while uvicorn starts
        proc.send_signal(sig)
        code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0 and said[-1:] == ["internvl-chat serve: stopped\n"], (code, said)


# `internvl-chat serve` that, once its run is over, gets each stop signal as its teardown would:
# the interpreter's exit takes most of a second after "stopped", and a second Ctrl-C or `kill` then
# landed under the default handlers put back (status -2 or -15)
_SIGNALLED_AFTER_THE_RUN = """
import os, signal, sys
from internvl_chat.cli import main
code = main(sys.argv[3:])  # past "-c", "-m", "internvl_chat.cli"
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    os.kill(os.getpid(), sig)
sys.exit(code)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_second_stop_signal_as_the_stopped_server_exits_keeps_status_0(tiny_original, sig):
    python = [sys.executable, "-c", _SIGNALLED_AFTER_THE_RUN]
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning", python=python) as (proc, lines):
        _next_match(lines, r"on http://127\.0\.0\.1:\d+/v1")
        proc.send_signal(sig)
        code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0 and said[-1:] == ["internvl-chat serve: stopped\n"], (code, said)


@pytest.mark.parametrize("ended", ["served", "loading"])
def test_serve_in_process_puts_the_callers_handlers_back_after_a_stop_signal(monkeypatch, ended):
    """A stop signal ended `serve` (as it served; SIGTERM as the model loaded): it put Ctrl-C's and
    SIGTERM's handlers back ignored, for the process's exit, also where its caller goes on (a test,
    a program serving in-process), which Ctrl-C could no longer stop. Only the command ignores them."""
    from internvl_chat.serve import main as serve_main

    def stopped_by_a_signal(settings, log_level):
        if ended == "loading":
            raise serve_main._Terminated
        return True  # a stop signal ended it

    monkeypatch.setattr(serve_main, "_serve", stopped_by_a_signal)
    before = {signum: signal.getsignal(signum) for signum in serve_main.STOP_SIGNALS}
    try:
        assert serve_main.serve(object()) == 0
        after = {signum: signal.getsignal(signum) for signum in before}
        assert after == before
        assert serve_main.serve(object(), exiting=True) == 0  # the command: the process ends now
        exiting = {signum: signal.getsignal(signum) for signum in before}
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert exiting[signal.SIGINT] is signal.SIG_IGN and exiting[signal.SIGTERM] is signal.SIG_IGN, exiting


# `internvl-chat serve` that gets a second stop signal once uvicorn has shut down, as it stops the
# engine thread (which waits for a running job to notice its cancel: a prefill chunk, a picture
# being encoded)
_SIGNALLED_AS_THE_ENGINE_STOPS = """
import os, signal, sys
from internvl_chat.cli import main
from internvl_chat.serve.engine import EngineWorker
sig, original = signal.Signals[sys.argv[1]], EngineWorker.stop
def stop(*args, **kwargs):
    os.kill(os.getpid(), sig)
    return original(*args, **kwargs)
EngineWorker.stop = stop
sys.exit(main(sys.argv[4:]))  # past sig, "-m", "internvl_chat.cli"
"""


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_stop_signal_while_the_engine_thread_stops_is_no_traceback(tiny_original, second):
    """It asked uvicorn's event loop, closed by then, to end the requests: "RuntimeError: Event loop
    is closed" and its traceback, status 1, the engine's media folder left behind."""
    python = [sys.executable, "-c", _SIGNALLED_AS_THE_ENGINE_STOPS, second]
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning", python=python) as (proc, lines):
        url = _next_match(lines, r"on (http://127\.0\.0\.1:\d+)/v1")[0].group(1)
        with urllib.request.urlopen(f"{url}/health", timeout=WAIT_S) as answer:  # uvicorn runs: its loop too
            assert answer.status == 200
        proc.send_signal(signal.SIGINT)
        code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0 and said[-1:] == ["internvl-chat serve: stopped\n"], (code, said)
        assert not any("Traceback" in line for line in said), said


# `internvl-chat serve` that sends itself a signal at one moment of its start: after the address
# is printed, as the engine thread starts; as uvicorn's event loop starts, before uvicorn has its
# own handlers; under uvicorn's handlers, before it listens.
_SIGNAL_AT_A_MOMENT = """
import os, signal, sys, uvicorn
from internvl_chat.cli import main
from internvl_chat.serve.engine import EngineWorker
sig, moment = signal.Signals[sys.argv[1]], sys.argv[2]
owner, name = {"engine start": (EngineWorker, "start"), "uvicorn run": (uvicorn.Server, "run"),
               "uvicorn startup": (uvicorn.Server, "startup")}[moment]
original = getattr(owner, name)
def signalled(*args, **kwargs):
    os.kill(os.getpid(), sig)
    return original(*args, **kwargs)
setattr(owner, name, signalled)
sys.exit(main(sys.argv[5:]))  # past sig, moment, "-m", "internvl_chat.cli"
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("moment", ["engine start", "uvicorn run", "uvicorn startup"])
def test_a_stop_signal_at_any_moment_of_the_start_stops_quietly_with_status_0(tiny_original, moment, sig):
    """The moment a signal comes must not matter. A Ctrl-C as the engine thread started used to
    end in "interrupted" (status 130) with the thread never stopped, and a SIGTERM or SIGHUP was
    raised as an exception wherever the program was, inside asyncio's machinery too."""
    python = [sys.executable, "-c", _SIGNAL_AT_A_MOMENT, sig, moment]
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning", python=python) as (proc, lines):
        code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0, (code, said)
        assert said[-1:] == ["internvl-chat serve: stopped\n"] and said.count(said[-1]) == 1, said
        assert not any("Traceback" in line or "rror" in line for line in said), said


def test_under_nohup_sighup_leaves_the_server_running(tiny_original):
    """A SIGHUP ignored at start (`nohup internvl-chat serve &`) stays ignored: the server must
    outlive the terminal it was started from."""
    ignoring_sighup = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                       "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")  # fmt: skip
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "warning",
                  python=[sys.executable, "-c", ignoring_sighup]) as (proc, lines):  # fmt: skip
        url = _next_match(lines, r"on (http://127\.0\.0\.1:\d+/v1)")[0].group(1)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=WAIT_S)
        stream = client.chat.completions.create(model=tiny_original.name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, stream=True)  # fmt: skip
        next(iter(stream))  # serving
        proc.send_signal(signal.SIGHUP)
        for _ in stream:  # the answer goes on
            pass
        out = client.chat.completions.create(model=tiny_original.name, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=2)  # fmt: skip
        assert out.usage.completion_tokens >= 1 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0


def test_the_terminal_closing_stops_the_server_gracefully_with_status_0(tiny_original):
    """The real thing behind SIGHUP: the server runs in a terminal (a pty) that closes mid-answer.
    The kernel sends SIGHUP, and whatever the server logs on its way out (uvicorn's info lines,
    "stopped") goes to a terminal that is gone."""
    argv = [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(tiny_original), "--port", "0",
            "--device", "cpu", "--dtype", "float32", "--max-context", "2048"]  # fmt: skip
    term = ptyprocess.PtyProcess.spawn(argv, env=_env(), dimensions=(24, 200))
    try:
        seen, deadline = b"", time.monotonic() + WAIT_S
        while not (found := re.search(rb"on (http://127\.0\.0\.1:\d+/v1)", seen)):
            assert time.monotonic() < deadline and term.isalive(), seen
            if select.select([term.fd], [], [], 0.1)[0]:
                seen += term.read(4096)
        client = openai.OpenAI(base_url=found.group(1).decode(), api_key="none", max_retries=0, timeout=WAIT_S)
        stream = client.chat.completions.create(model=tiny_original.name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=1500, stream=True)  # fmt: skip
        next(iter(stream))  # a request in flight
        term.fileobj.close()  # the terminal closes
        with contextlib.suppress(openai.APIError):  # it ends, or is cut after the grace period
            for _ in stream:
                pass
        deadline = time.monotonic() + WAIT_S
        while term.isalive():
            assert time.monotonic() < deadline, "the server outlived its terminal"
            time.sleep(0.05)
        assert (term.exitstatus, term.signalstatus) == (0, None)  # it used to die of the signal
    finally:
        if term.isalive():
            term.kill(signal.SIGKILL)
            term.wait()
        term.close()  # the terminal is closed and the process reaped: nothing more is sent


@pytest.mark.parametrize(("variable", "value", "line"), [
    ("ALL_PROXY", "socks5://me:s3cret@127.0.0.1:1080",
     "ALL_PROXY names a SOCKS proxy, which needs the socksio package: pip install 'httpx[socks]', or unset ALL_PROXY"),
    ("https_proxy", "ftp://me:s3cret@127.0.0.1:21",
     "the proxy in https_proxy is not a usable URL (http://, https:// or socks5://HOST:PORT); fix or unset https_proxy"),
])  # fmt: skip
def test_a_proxy_that_remote_media_cannot_use_is_a_one_line_error_at_start(monkeypatch, tmp_path, variable, value, line):
    """`--allow-remote-media` fetches through the environment's proxies: one httpx cannot use was
    found only by each request (an ImportError as a 500, or a 400 blaming the client's URL)."""
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import main

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(variable, value)
    monkeypatch.setitem(sys.modules, "socksio", None)  # not installed (an import of it fails)
    missing = str(tmp_path / "no-model")  # the check comes before the model loads
    with pytest.raises(UsageError) as err:
        main(["--config", os.devnull, "--model", missing, "--allow-remote-media"])
    assert str(err.value) == line and err.value.exit_code == 2


# `internvl-chat serve` whose answers stop after their first piece of text until they are cancelled:
# a request still running when the grace period of a shutdown is over, at no moment to race for
_STALLING = """
import sys
from internvl_chat.cli import main
from internvl_chat.serve import engine
real_init = engine.EngineWorker.__init__
def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    def on_event(job, event):
        if job.texts:
            job.cancel.wait()
        job.texts += bool(event["text"])
    self.on_event = on_event
engine.Job.texts = 0
engine.EngineWorker.__init__ = init
sys.exit(main(sys.argv[3:]))  # past "-c", "-m", "internvl_chat.cli"
"""


@pytest.mark.parametrize("queued_stream", [False, True], ids=["queued plain", "queued stream"])
def test_requests_still_running_after_the_grace_period_get_a_clean_503(tiny_original, queued_stream):
    """uvicorn's end of the grace period cancelled the handlers: a stream was cut mid-chunk (no
    error, no [DONE]), a queued non-streamed request got a text/plain 500, and the log showed a
    CancelledError traceback for each. A queued stream has sent no headers yet: it gets the 503
    too (it got a 200 and an error event)."""
    import httpx

    python = [sys.executable, "-c", _STALLING]
    flags = ("--max-context", "2048", "--queue-depth", "1", "--log-level", "info")
    with _serving(tiny_original, *flags, python=python, with_stdout=True) as (proc, lines):
        url = _next_match(lines, r"on (http://127\.0\.0\.1:\d+)/v1")[0].group(1)
        body = {"model": tiny_original.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500}
        answers: queue.Queue[httpx.Response] = queue.Queue()

        def post() -> None:
            answers.put(httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": queued_stream}, timeout=WAIT_S))

        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=WAIT_S) as stream:
            events = stream.iter_lines()
            while '"content":""' in (line := next(events)) or not line:  # up to its first text: it runs
                pass
            # two more: one waits in the queue (depth 1), the other is refused; which one is which does not matter
            for _ in range(2):
                threading.Thread(target=post, daemon=True).start()
            assert answers.get(timeout=WAIT_S).status_code == 429
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in events if line]
        # the engine's "cancelled" or the handler's "shutting_down": both say why
        assert rest[-1] == "data: [DONE]" and "the server is shutting down" in rest[-2], rest
        queued = answers.get(timeout=WAIT_S)
        assert queued.status_code == 503 and queued.json()["error"]["code"] == "shutting_down", queued.text
        code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0 and "internvl-chat serve: stopped\n" in said, (code, said)
        assert not any("Traceback" in line or "Cancel" in line for line in said), said


# `internvl-chat serve` whose connections have a small send buffer, fixed (SO_SNDBUF on the listening
# socket, which its connections inherit, turns off the kernel's autotuning, up to 4 MiB here)
_SMALL_SEND_BUFFER = """
import socket, sys
from internvl_chat.cli import main
from internvl_chat.serve import main as serve_main
bind = serve_main.bind_socket
def bind_socket(*args, **kwargs):
    sock = bind(*args, **kwargs)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    return sock
serve_main.bind_socket = bind_socket
sys.exit(main(sys.argv[3:]))  # past "-c", "-m", "internvl_chat.cli"
"""
SEND_BUFFER = 32 << 10  # the kernel doubles it: 64 KiB, its payload less
UNSENT_BLOCKED = 16 << 10  # more than the response head: bytes of the answer the client has no room for


def _wait_for_unsent(server_port: int, client_port: int) -> None:
    """Until the kernel holds over UNSENT_BLOCKED bytes the server sent to this client unread (its side
    of the connection in /proc/net/tcp has a send queue): the answer is flowing and the client's window
    is full. With the server's send buffer under one event of the answer (_SMALL_SEND_BUFFER), the
    server is blocked writing to it then. Without /proc, at once."""
    ports = (f":{server_port:04X}", f":{client_port:04X}")  # local and remote address, hex
    for _ in range(WAIT_S * 10):
        try:
            with open("/proc/net/tcp") as table:
                rows = [row.split() for row in table]
        except OSError:
            return
        if any(row[1].endswith(ports[0]) and row[2].endswith(ports[1])
               and int(row[4].split(":")[0], 16) > UNSENT_BLOCKED for row in rows[1:]):  # fmt: skip
            return
        time.sleep(0.1)
    pytest.fail("the server never blocked writing to the client")


def test_a_client_that_reads_none_of_its_stream_is_dropped_when_the_grace_period_ends(tiny_original):
    """A handler waiting to write to a client that reads nothing never ended: the end of the
    grace period ended the engine's jobs, not the writes, and uvicorn cancelled the handler 5 s
    later, a CancelledError traceback in the log."""
    python = [sys.executable, "-c", _SMALL_SEND_BUFFER.replace("SEND_BUFFER", str(SEND_BUFFER))]
    with _serving(tiny_original, "--max-context", "2048", "--log-level", "info", with_stdout=True,
                  python=python) as (proc, lines):  # fmt: skip
        url = _next_match(lines, r"on http://127\.0\.0\.1:(\d+)/v1")[0]
        # each of the 16 choices echoes the prompt's 2,000 tokens with 5 alternatives each: one
        # event of a choice (~260 KB) is more than the kernel's buffers hold (the server's fixed
        # send buffer, the client's receive buffer), the whole answer (~4 MB) under the 32 MiB a
        # stream may let wait
        body = json.dumps({"model": tiny_original.name, "prompt": [100] * 2000, "max_tokens": 1, "n": 16,
                           "echo": True, "logprobs": 5, "stream": True}).encode()  # fmt: skip
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it reads no more than the head
        client.connect(("127.0.0.1", int(url.group(1))))
        with client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            assert client.recv(12) == b"HTTP/1.1 200"
            # the stop once the server is blocked writing to it: a prefill slower than the grace
            # period (a busy machine) ended the job before its answer filled the buffers; so did
            # choices made slower than it once the first had filled the client's window (with the
            # kernel's autotuned send buffer of MBs, the server was not blocked yet)
            _wait_for_unsent(int(url.group(1)), client.getsockname()[1])
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(WAIT_S)
        said = _drain(lines)
        assert code == 0 and said[-1:] == ["internvl-chat serve: stopped\n"], (code, said)
        assert not any("Traceback" in line or "Cancel" in line for line in said), said
        assert any("the server is shutting down and it is not reading its answer" in line for line in said), said


@pytest.mark.parametrize("during", [True, False], ids=["during the shutdown", "before it starts"])
def test_a_second_stop_signal_ends_the_running_requests_at_once(during):
    """uvicorn says "CTRL+C to force quit" while it waits for running requests, but its handler is
    replaced by ours, which only set the stop flag again: a second signal changed nothing."""
    import uvicorn
    from uvicorn.lifespan.off import LifespanOff

    from internvl_chat.serve.main import GracefulServer, _StopRequest

    class Worker:
        def __init__(self) -> None:
            self.ended = asyncio.Event()

        def end_jobs(self) -> None:
            self.ended.set()

    async def scenario() -> None:
        worker = Worker()
        config = uvicorn.Config(lambda *a: None, timeout_graceful_shutdown=600, log_level="error")
        config.load()
        server = GracefulServer(config, worker.end_jobs)
        server.servers, server.lifespan = [], LifespanOff(config)  # what startup() sets
        stop = _StopRequest(server)
        request = asyncio.create_task(worker.ended.wait())  # a request that runs until the engine's jobs end
        server.server_state.tasks.add(request)
        request.add_done_callback(server.server_state.tasks.discard)  # as uvicorn does
        stop(signal.SIGINT, None)
        if not during:
            stop(signal.SIGINT, None)
        shutdown = asyncio.create_task(server.shutdown())
        if during:
            await asyncio.sleep(0)  # the shutdown has begun, under uvicorn's signal handler
            server.handle_exit(signal.SIGINT, None)
        await asyncio.wait_for(shutdown, WAIT_S)  # not the 600 s grace
        assert worker.ended.is_set() and request.done() and not request.cancelled() and not server.force_exit

    asyncio.run(scenario())


def test_the_servers_own_info_and_debug_lines_are_shown_at_those_levels(tiny_original):
    """"closing a connection …: its request head did not arrive in time" (debug) and the other
    lines of internvl_chat.serve below warning went to Python's last-resort handler, which
    prints warnings only: --log-level debug or info never showed them."""
    flags = ("--max-context", "256", "--log-level", "debug", "--header-timeout", "1")
    with _serving(tiny_original, *flags, with_stdout=True) as (proc, lines):
        port = int(_next_match(lines, r"on http://127\.0\.0\.1:(\d+)/v1")[0].group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # and no more
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")  # the line is logged before the close
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
        said = _drain(lines)
    assert any(re.match(r"DEBUG: +closing a connection from .*: its request head did not arrive in time", line)
               for line in said), said  # fmt: skip


def test_a_closed_stdout_does_not_fill_stderr_with_tracebacks(tiny_original):
    """uvicorn writes its access log to stdout; with that pipe's reader gone (`serve | head`), the
    log's handler failed on every request and logging printed a traceback for each on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(tiny_original), "--port", "0",
         "--device", "cpu", "--dtype", "float32", "--max-context", "256"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        proc.stdout.close()  # its reader left
        line = proc.stderr.readline()
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line).group(1))
        for _ in range(3):  # the access log is written before the answer
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert "Traceback" not in rest and "Logging error" not in rest, rest
    assert rest.endswith("internvl-chat serve: stopped\n"), rest


def test_a_body_still_coming_when_the_grace_period_ends_gets_a_clean_503(tiny_original):
    """A slow upload in flight at a shutdown was cancelled by uvicorn: a text/plain 500 and a
    CancelledError traceback in the log."""
    with _serving(tiny_original, "--max-context", "256", "--log-level", "info", with_stdout=True) as (proc, lines):
        port = int(_next_match(lines, r"on http://127\.0\.0\.1:(\d+)/v1")[0].group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            # uvicorn says "100 Continue" when the handler starts reading the body: it waits for it now
            assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(b'{"model"')
            proc.send_signal(signal.SIGTERM)
            answer = b""
            while block := sock.recv(4096):
                answer += block
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["code"] == "shutting_down", answer
        assert proc.wait(WAIT_S) == 0
        said = _drain(lines)
    assert not any("Traceback" in line or "Cancel" in line for line in said), said
