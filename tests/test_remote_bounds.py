"""A server that streams valid events without end (ignores max_tokens, never finishes, trickles):
the client cuts the answer at the length it asked for, or at [remote] answer_timeout, keeps what
arrived with a one-line note, and the conversation goes on. Real local HTTP servers; the time
bound is driven by a clock the test moves, never by waiting."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from remote_helpers import FakeServer, Reply, dripping_server, fixture, unanswered_port
from rich.console import Console

from internvl_chat.chat import answer_bounds, remote_http, remote_sockets, remote_stream
from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.sampling import params_from_settings as sampling_params
from internvl_chat.errors import RemoteError
from internvl_chat.settings import Settings, load_settings
from internvl_chat.threads import start_worker
from internvl_chat.ui.app import OK, App

REPO = Path(__file__).resolve().parent.parent
GOOD = fixture("vllm/stream.sse")
STOP = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
LENGTH = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\ndata: [DONE]\n\n'
MAX_NEW = 8
PIECES = MAX_NEW * answer_bounds.PIECES_PER_TOKEN + answer_bounds.PIECE_SLACK
CHARS = MAX_NEW * answer_bounds.CHARS_PER_TOKEN + answer_bounds.ANSWER_SLACK
CONNECTING_WAIT_S = 60.0


def piece(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"


def connected(server: FakeServer, answer_timeout: float | None = None) -> RemoteConversation:
    """A conversation with one good turn (max_new_tokens 8). Its read timeout, a minute, only ends a
    test whose bound failed (a hang, else) and never comes first: the bound is moved by a fake clock."""
    server.chat(Reply.sse(GOOD))
    conv = RemoteConversation.connect(server.url, timeout=60, params=SamplingParams(max_new_tokens=MAX_NEW),
                                      answer_timeout=answer_timeout)  # fmt: skip
    list(conv.ask("first"))
    return conv


def answer(conv: RemoteConversation, text: str = "second") -> tuple[str, dict]:
    events = list(conv.ask(text))
    return "".join(e["text"] for e in events), events[-1]


class Clock:
    """answer_bounds' clock, moved by the test (`step`: by itself, at every reading)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.step = 0.0

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(answer_bounds, "clock", clock)
    return clock


# ---- the length asked for ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "kept"),
    [
        (Reply.sse(piece("x") * 5000 + STOP), "x" * PIECES),  # one token a piece, far past max_tokens
        (Reply(pieces=[piece("x")], end="endless"), "x" * PIECES),  # the same, never finishing
        (Reply.sse(piece("y" * 200_000) + STOP), "y" * CHARS),  # one piece packed with text
        (Reply.sse(piece("z" * 100) * 40 + STOP), "z" * CHARS),
    ],
    ids=["many-pieces", "endless", "one-huge-piece", "packed-pieces"],
)
def test_an_answer_past_the_length_asked_for_is_cut_and_kept(reply, kept):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(reply)
        text, final = answer(conv)
        assert text == kept and conv.turns[-1].reply == kept
        assert final["finish_reason"] == "length" and conv.turns[-1].finish_reason == "length"
        assert final["note"].startswith("the server sent more than the 8 tokens asked for (does it ignore max_tokens?)")
        assert "\n" not in final["note"]
        server.chat(Reply.sse(piece("ok") + STOP))
        assert answer(conv, "third")[0] == "ok"  # the conversation goes on, the cut answer resent as kept
        assert [m["content"] for m in server.chat_bodies()[-1]["messages"] if m["role"] == "assistant"][-1] == kept


@pytest.mark.parametrize("end", [STOP, LENGTH])
def test_an_honest_answer_of_the_length_asked_for_is_not_cut(end):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply.sse(piece("w") * MAX_NEW + end))
        text, final = answer(conv)
        assert text == "w" * MAX_NEW and final["note"] is None
        assert final["finish_reason"] == ("stop" if end is STOP else "length")


def test_a_flood_of_events_without_text_is_one_line_and_the_conversation_is_unchanged():
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply.sse(b"data: {}\n\n" * 5000 + STOP))
        with pytest.raises(RemoteError, match=r"^the server sent far more than the 8 tokens asked for, and no text"):
            answer(conv)
        assert [t.user_text for t in conv.turns] == ["first"]


# ---- the time an answer may take -----------------------------------------------------------------


def test_an_answer_past_answer_timeout_is_cut_and_kept(clock):
    """A server that sends a piece, then nothing (its next piece would come in a few seconds, or never):
    past the total time the answer stops at once, with what arrived."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        server.chat(Reply(pieces=[piece("Hel")], end="hang"))
        events = conv.ask("second")
        assert next(events)["text"] == "Hel"
        clock.now = 601.0
        rest = list(events)
        assert rest[-1]["finish_reason"] == "length" and conv.turns[-1].reply == "Hel"
        assert rest[-1]["note"] == ("the answer took longer than [remote] answer_timeout (600 s) and is cut there; "
                                    "raise it to wait longer")  # fmt: skip
        server.chat(Reply.sse(piece("ok") + STOP))
        assert answer(conv, "third")[0] == "ok"


def test_a_trickle_of_pieces_is_cut_at_answer_timeout(clock):
    """Pieces that keep coming (each restarts the read timeout) do not hold the answer past the bound."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        server.chat(Reply(pieces=[piece("a")], held=[piece("b")] * 5, end="hang"))
        events = conv.ask("second")
        assert next(events)["text"] == "a"
        server.go_on.release()
        assert next(events)["text"] == "b"
        clock.now = 601.0
        server.go_on.release()  # another piece may or may not come before the watcher stops the answer
        final = list(events)[-1]
        assert final["finish_reason"] == "length" and conv.turns[-1].reply in ("ab", "abb")
        assert "answer_timeout" in final["note"]


def test_no_text_within_answer_timeout_is_one_line_and_the_conversation_is_unchanged(clock):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        server.chat(Reply(pieces=[b": ping\n\n"], end="hang"))
        clock.step = 100.0  # past the bound a few readings after the request starts
        with pytest.raises(RemoteError, match=r"^the server sent no answer text within \[remote\] answer_timeout \(600 s\)"):
            answer(conv)
        assert [t.user_text for t in conv.turns] == ["first"]


def test_a_head_that_never_ends_is_cut_at_answer_timeout(clock):
    """Before the head there is no answer socket to shut: the deadline must still end the request,
    not wait for the head's own bound (the read timeout, two minutes here)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
    with dripping_server(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a", seconds=120) as url:
        conv.client.close()
        conv.client = type(conv.client)(url, "", 120)
        clock.step = 100.0
        with pytest.raises(RemoteError, match=r"^the server sent no answer text within \[remote\] answer_timeout"):
            answer(conv)
        assert not conv.client.head_watch.fired
        assert [t.user_text for t in conv.turns] == ["first"]


def test_a_connection_still_being_made_ends_at_answer_timeout(clock):
    """A connect that never completes (a host gone away) held the answer for the connect timeout
    (30 s) past the deadline: the watcher has no socket to shut before it connects. The clock does
    not move here, so only the connect's own timeout, ending at the deadline, can end it."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=0.5)
    with unanswered_port() as port:
        conv.client.close()
        conv.client = type(conv.client)(f"http://127.0.0.1:{port}/v1", "", 120)
        with pytest.raises(RemoteError, match=r"^the server sent no answer text within \[remote\] answer_timeout \(0.5 s\)"):
            answer(conv)
        assert [t.user_text for t in conv.turns] == ["first"]


def test_ctrl_c_while_connecting_ends_the_attempt_at_once(tmp_path):
    """The REPL's Ctrl-C before the first piece raises KeyboardInterrupt in the main thread, which
    ends the connect's wait (Python retries a wait a signal interrupts only when its handler
    returns): a host gone away does not hold the REPL for the connect timeout."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        settings = load_settings(os.devnull, env={}, overrides={"remote.server": server.url})
    with unanswered_port() as port:
        conv.client.close()
        conv.client = client = type(conv.client)(f"http://127.0.0.1:{port}/v1", "", 120)
        trace = client.trace
        main = threading.main_thread().ident

        def spy(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.started":  # the user presses Ctrl-C now, or a little later
                start_worker(lambda: signal.pthread_kill(main, signal.SIGINT), "test-ctrl-c")
            trace(event, info)

        client.trace = spy
        out = io.StringIO()
        app = App(conv, settings, Console(file=out, width=300, color_system=None), interactive=True, cwd=tmp_path)
        assert app.handle_line("second") == OK
        assert "[cancelled before the answer began; the conversation is unchanged]" in out.getvalue()
        assert [t.user_text for t in conv.turns] == ["first"]


def test_a_cancel_while_connecting_ends_the_attempt_at_once(monkeypatch):
    """A program that sets `cancel` while the connection is being made (no socket to shut yet)
    waited for the connect timeout (30 s); here it would be a connect timeout of an hour, which
    the kernel's SYN retries end after about two minutes. The cancel comes as the connect starts,
    or a little later."""
    monkeypatch.setattr(remote_http, "CONNECT_TIMEOUT_S", 3600.0)
    with unanswered_port() as port:
        client = remote_http.ApiClient(f"http://127.0.0.1:{port}/v1", "", 3600)
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=MAX_NEW))
        cancel = threading.Event()
        trace = client.trace

        def spy(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.started":
                cancel.set()
            trace(event, info)

        client.trace = spy
        outcome: list = []
        asking = start_worker(lambda: outcome.append(list(conv.ask("hi", cancel=cancel))), "test-ask")
        asking.join(CONNECTING_WAIT_S)  # generous; without the fix the connect goes on for minutes
        assert not asking.is_alive(), "the cancel did not end the connect"
        assert outcome and outcome[0][-1]["finish_reason"] == "cancelled"


def test_after_a_cancel_while_connecting_the_next_answer_connects():
    """The abandon is of that request only; a connection made after it is closed, not used."""
    with FakeServer(fixture("vllm/models.json")) as server:
        client = remote_http.ApiClient(server.url, "", 120)
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=MAX_NEW))
        cancel = threading.Event()
        trace = client.trace

        def spy(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.started" and not cancel.is_set():
                cancel.set()
                for _ in range(int(CONNECTING_WAIT_S / 0.01)):  # the watcher abandons the connect before it begins
                    if client.connector.abandoned:
                        break
                    time.sleep(0.01)
            trace(event, info)

        client.trace = spy
        server.chat(Reply.sse(piece("ok") + STOP))
        assert list(conv.ask("hi", cancel=cancel))[-1]["finish_reason"] == "cancelled"
        text, final = answer(conv, "again")
        assert (text, final["finish_reason"]) == ("ok", "stop")
        assert len(server.chat_bodies()) == 1  # the abandoned connect sent nothing


def test_an_abort_before_the_request_is_made_sends_none():
    """The watcher starts before the answer's request: a cancel already set aborted the stream
    before it had a socket or a connect in progress, and the request was then made all the same,
    waiting for a head that a silent server never sends (up to the timeout, an hour here)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections are made by the kernel, and never answered
        client = remote_http.ApiClient("http://127.0.0.1:%d/v1" % listener.getsockname()[1], "", 3600)
        stream = client.stream_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        stream.abort()
        chunks: list = []
        reading = start_worker(lambda: chunks.extend(stream), "test-read")
        reading.join(CONNECTING_WAIT_S)
        assert not reading.is_alive(), "the aborted stream made its request and waits for the head"
        assert chunks == [] and stream.aborted
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was made
        client.close()


def test_an_abort_just_as_the_connect_ends_shuts_the_new_connection(monkeypatch):
    """An abort that lands after the Connector saw no abandon, but before httpcore's trace adds the
    new socket to the client's: abandon had nothing to end and shut_all did not see the socket, so
    the request went out and waited for a head that a silent server never sends (up to the
    timeout, an hour here). The abort comes exactly there (the connect's outcome is being taken)."""
    import socket

    real_outcome = remote_sockets._Attempt.outcome
    streams: list = []

    def outcome_then_abort(attempt):
        made = real_outcome(attempt)
        streams[0].abort()
        return made

    monkeypatch.setattr(remote_sockets._Attempt, "outcome", outcome_then_abort)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections are made by the kernel, and never answered
        client = remote_http.ApiClient("http://127.0.0.1:%d/v1" % listener.getsockname()[1], "", 3600)
        stream = client.stream_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        streams.append(stream)
        chunks: list = []
        reading = start_worker(lambda: chunks.extend(stream), "test-read")
        reading.join(CONNECTING_WAIT_S)
        assert not reading.is_alive(), "the abort was lost: the request waits for the head"
        assert chunks == [] and stream.aborted
        client.close()


def test_a_connect_within_answer_timeout_keeps_its_own_timeout(clock):
    """The deadline only shortens a connect that would outlast it."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        conv.client.close()
        conv.client = client = type(conv.client)(server.url, "", 120)  # a new connection is made
        seen: list[float] = []
        trace = client.trace

        def spy(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.started":
                seen.append(info["timeout"])
            trace(event, info)

        client.trace = spy
        server.chat(Reply.sse(piece("ok") + STOP))
        assert answer(conv)[0] == "ok"
        assert seen == [30.0]


def test_an_answer_that_finished_is_not_cut_by_a_late_deadline(clock):
    """The server said finish_reason, then left the stream open: the answer is whole."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        finished = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        server.chat(Reply(pieces=[piece("done") + finished], end="hang"))
        events = conv.ask("second")
        assert next(events)["text"] == "done"
        clock.now = 601.0
        final = list(events)[-1]
        assert final["finish_reason"] == "stop" and final["note"] is None


# ---- after the server finished the answer ---------------------------------------------------------

# the answer's last piece carries its finish_reason (a finish_reason on the chunk with the first text arms no grace)
FINISHED = (b'data: {"choices": [{"index": 0, "delta": {"content": "Done"}}]}\n\n'
            b'data: {"choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]}\n\n')  # fmt: skip
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}}\n\n'
SERVER_USAGE = {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}
READ_TIMEOUT_S = 300.0  # [remote] timeout's default: what a finished answer waited for
WATCH_STEP_S = 50.0


class WatcherClock(Clock):
    """A clock that moves `step` only at the watcher thread's readings (one a poll): the time its
    polls measure. The stream's own bound (remote_stream's keep-alive timeout) reads it too and sees
    that time, without moving it: which of the two ends a wait is decided by the clock alone.

    `armed`: the step it takes once the reader next asks the server for more (the test's thread,
    which holds the answer at a yield until then, sets it): a step set by the test itself also
    moved the clock at each poll until its thread read on, by 50 s a poll on a busy machine that
    ran the watcher and not it (half a second: "the finished answer waited 450 s")."""

    armed = 0.0

    def __call__(self) -> float:
        now = self.now
        if threading.current_thread().name == "remote-watch":
            self.now += self.step
        return now


@pytest.fixture
def watcher_clock(monkeypatch) -> WatcherClock:
    clock = WatcherClock()
    monkeypatch.setattr(answer_bounds, "clock", clock)
    monkeypatch.setattr(remote_stream, "time", types.SimpleNamespace(monotonic=clock))
    real_pieces = remote_stream._pieces

    def pieces(chunks):
        for one in real_pieces(chunks):
            yield one
            if clock.armed:  # the reader asks for more: the consumer is done with what came
                clock.step, clock.armed = clock.armed, 0.0

    monkeypatch.setattr(remote_stream, "_pieces", pieces)
    return clock


def pieces_taken(monkeypatch, count: int) -> list[threading.Event]:
    """Events, the n-th set once the reader asks for the piece after piece n (n < count): that
    piece's chunk is taken, and the stream waits for more."""
    taken = [threading.Event() for _ in range(count)]
    real_pieces = remote_stream._pieces

    def pieces(chunks):
        for n, one in enumerate(real_pieces(chunks)):
            yield one
            if n < count:
                taken[n].set()

    monkeypatch.setattr(remote_stream, "_pieces", pieces)
    return taken


def finished_then(conv: RemoteConversation, clock: WatcherClock) -> tuple[float, dict]:
    """Ask; once the answer (its finish_reason in the same chunk) has come, let the clock run: the
    time the rest of the turn took by it, and its final event."""
    events = conv.ask("second")
    assert next(events)["text"] + next(events)["text"] == "Done."
    finished_at, clock.armed = clock.now, WATCH_STEP_S  # from the reader's next read
    final = list(events)[-1]
    waited, clock.step = clock.now - finished_at, 0.0
    return waited, final


def goes_on(conv: RemoteConversation, server: FakeServer) -> None:
    """The next turn is answered, with the finished answer resent whole."""
    server.chat(Reply.sse(GOOD))
    text, final = answer(conv, "third")
    assert text and final["finish_reason"] == "stop" and final["note"] is None
    assert [m["content"] for m in server.chat_bodies()[-1]["messages"] if m["role"] == "assistant"][-1] == "Done."


@pytest.mark.parametrize("usage", [b"", USAGE], ids=["no-usage", "usage"])
@pytest.mark.parametrize("after", ["silence", "keep-alives"])
def test_a_finished_answer_whose_stream_stays_open_ends_after_a_short_grace(watcher_clock, usage, after):
    """A server that sends the chunk with finish_reason (and the usage, or not), then only keep-alives
    or nothing, neither [DONE] nor closing: the whole answer and a frozen prompt waited for [remote]
    timeout (300 s; here the fake clock's, as the stream's keep-alive bound reads it, or the answer
    deadline's for silence, since a silent socket's read timeout cannot be faked). It ends after the
    grace, whole, with the server's usage when it came (else the client's count), and the next turn
    works (the unfinished connection is closed, not reused)."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply.sse(GOOD))
        conv = RemoteConversation.connect(server.url, timeout=READ_TIMEOUT_S, params=SamplingParams(max_new_tokens=MAX_NEW),
                                          answer_timeout=1000)  # fmt: skip
        list(conv.ask("first"))
        server.chat(Reply(pieces=[FINISHED + usage, *([b": ping\n\n"] if after == "keep-alives" else [])],
                          end="endless" if after == "keep-alives" else "hang"))  # fmt: skip
        waited, final = finished_then(conv, watcher_clock)
        assert answer_bounds.FINISHED_GRACE_S <= waited < READ_TIMEOUT_S, f"the finished answer waited {waited:g} s"
        assert final["finish_reason"] == "stop" and final["note"] is None
        assert conv.turns[-1].reply == "Done." and conv.turns[-1].finish_reason == "stop"
        assert final["usage"] == (SERVER_USAGE if usage else None)
        assert final["timing"]["decode_tokens"] == 1  # the server's 2 tokens, else the 2 pieces seen, less the first
        goes_on(conv, server)


def test_a_finished_answer_without_a_cancel_or_answer_timeout_ends_after_the_grace(watcher_clock):
    """No cancel event and no answer_timeout (the API's defaults): no watcher ran, and the finished
    answer waited for the read timeout; it starts when the server finishes. That timeout is 20 s
    here, real: it ends the wait of the unfixed code (a failure), never the grace's."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply.sse(GOOD))
        conv = RemoteConversation.connect(server.url, timeout=20, params=SamplingParams(max_new_tokens=MAX_NEW))
        list(conv.ask("first"))
        server.chat(Reply(pieces=[FINISHED + USAGE], end="hang"))
        waited, final = finished_then(conv, watcher_clock)
        assert answer_bounds.FINISHED_GRACE_S <= waited < READ_TIMEOUT_S, f"the finished answer waited {waited:g} s"
        assert final["finish_reason"] == "stop" and final["usage"] == SERVER_USAGE
        goes_on(conv, server)


def test_what_follows_the_finish_reason_within_the_grace_is_taken(clock):
    """The usage and [DONE] that come after the finish_reason (here when the test lets them, the
    clock standing still) are read, not cut by the grace."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=600)
        server.chat(Reply(pieces=[FINISHED], held=[b": ping\n\n", USAGE + b"data: [DONE]\n\n"]))
        events = conv.ask("second")
        assert next(events)["text"] + next(events)["text"] == "Done."
        server.go_on.release(2)
        final = list(events)[-1]
        assert final["finish_reason"] == "stop" and final["usage"] == SERVER_USAGE
        goes_on(conv, server)


def watcher_polls(monkeypatch) -> list[threading.Thread]:
    """answer_bounds' events made CountingEvents, and its watchers kept: the test can wait for
    their polls."""
    monkeypatch.setattr(answer_bounds, "threading", types.SimpleNamespace(Event=CountingEvent))
    watchers: list[threading.Thread] = []
    real_start = answer_bounds.start_worker
    monkeypatch.setattr(answer_bounds, "start_worker", lambda *a: watchers.append(real_start(*a)) or watchers[-1])
    return watchers


def polled_twice(watchers: list[threading.Thread]) -> None:
    """Wait until the watcher has begun two polls since now (so it has looked at the clock since),
    or has ended (it shut the stream)."""
    polls, deadline = CountingEvent.waits, time.monotonic() + CONNECTING_WAIT_S  # a stuck watcher fails, not hangs
    while CountingEvent.waits < polls + 2 and any(w.is_alive() for w in watchers):
        assert time.monotonic() < deadline, "the watcher stopped polling"
        time.sleep(0.01)


def shut_as_bsd_does(sock: socket.socket) -> None:
    """remote_sockets.shut as macOS and the BSDs do it: the bytes already received are dropped too."""
    remote_sockets.shut(sock)
    try:
        while sock.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass  # nothing more, or closed


def test_a_consumer_that_stalls_after_the_finish_loses_nothing_the_server_sent_promptly(clock, monkeypatch):
    """The server sends the finish_reason, then the usage and [DONE] at once; the answer's consumer
    (a slow terminal, a screen redrawn, the program's UI busy) takes longer than the grace before it
    reads on. The grace was wall time from the finish: the watcher shut the stream while the usage
    sat unread in its socket, and the answer lost it (the context count fell back to estimates) where
    a shut socket drops what it holds (macOS, BSD; Windows resets it: done here as they do; Linux
    still reads it, but the connection was closed, not kept). Only the time the reader waits for the
    server counts."""
    watchers = watcher_polls(monkeypatch)
    monkeypatch.setattr(remote_stream, "shut", shut_as_bsd_does)
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        # the first turn's reply set `finished` (its server thread may do so after the client has it
        # all): once it has, cleared, so that the wait below is for this answer's rest
        assert server.finished.wait(CONNECTING_WAIT_S)
        server.finished.clear()
        server.chat(Reply(pieces=[FINISHED], held=[USAGE + b"data: [DONE]\n\n"]))
        events = conv.ask("second")
        assert next(events)["text"] + next(events)["text"] == "Done."  # the consumer has the answer's text, and stalls here
        server.go_on.release()
        assert server.finished.wait(CONNECTING_WAIT_S)  # the server sent the rest promptly
        clock.now += 10 * answer_bounds.FINISHED_GRACE_S
        polled_twice(watchers)
        final = list(events)[-1]  # the consumer reads on
        assert final["finish_reason"] == "stop" and final["note"] is None
        assert final["usage"] == SERVER_USAGE and conv.turns[-1].usage == SERVER_USAGE
        goes_on(conv, server)


def test_a_program_stopped_while_it_waits_after_the_finish_loses_nothing_sent_meanwhile(clock, monkeypatch):
    """The whole program is stopped (Ctrl-Z, then `fg`) while the reader waits for what follows the
    finish_reason, and the server sends it meanwhile: once it goes on, the watcher saw the clock
    past the grace and shut the stream before the reader got to the bytes already there. A poll
    counts a bounded time, so a stop is not the server's silence."""
    watchers = watcher_polls(monkeypatch)
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        waiting, = pieces_taken(monkeypatch, 1)  # the finished chunk is taken: the stream waits for more
        server.chat(Reply(pieces=[FINISHED], held=[USAGE + b"data: [DONE]\n\n"]))
        got: list = []
        reader = start_worker(lambda: got.append(answer(conv)), "test-reader")
        assert waiting.wait(CONNECTING_WAIT_S)
        clock.now += 10 * answer_bounds.FINISHED_GRACE_S  # the stop: the clock went on, nothing ran
        polled_twice(watchers)
        server.go_on.release()
        reader.join(CONNECTING_WAIT_S)
        text, final = got[0]
        assert text == "Done." and final["finish_reason"] == "stop"
        assert final["usage"] == SERVER_USAGE
        goes_on(conv, server)


PREMATURE = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}\n\n'


def test_a_finish_reason_before_any_text_arms_no_grace(clock, monkeypatch):
    """Some proxies put finish_reason "stop" on a stream's first chunk, the role's, before any text
    (Open WebUI's /api/chat/completions with an Ollama model; the same on every reasoning chunk):
    the text came more than the grace later (a long prefill, a model thinking first), and the answer
    was ended at once, kept empty as a whole "stop" answer. Only a finish after some text is one."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        watchers: list[threading.Thread] = []
        real_start = answer_bounds.start_worker
        monkeypatch.setattr(answer_bounds, "start_worker", lambda *a: watchers.append(real_start(*a)) or watchers[-1])
        first_read, = pieces_taken(monkeypatch, 1)  # the premature chunk has been taken: the stream waits for more
        server.chat(Reply(pieces=[PREMATURE], held=[piece("Hello."), STOP]))
        got: list = []
        reader = start_worker(lambda: got.append(answer(conv)), "test-reader")
        assert first_read.wait(CONNECTING_WAIT_S)
        clock.now += 10 * answer_bounds.FINISHED_GRACE_S  # the text comes well past the grace
        for watcher in watchers:  # whatever the grace would do, it has done before the text comes
            watcher.join(CONNECTING_WAIT_S)
        server.go_on.release(2)
        reader.join(CONNECTING_WAIT_S)
        text, final = got[0]
        assert text == "Hello." and final["finish_reason"] == "stop", (text, final)
        assert conv.turns[-1].reply == "Hello."


def finishing_piece(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class CountingEvent(threading.Event):
    """answer_bounds' events, counting the watcher's polls (one wait each)."""

    waits = 0

    def wait(self, timeout=None):
        CountingEvent.waits += 1
        return super().wait(timeout)


def test_a_finish_reason_on_every_chunk_is_no_finish_once_text_came_after_it(clock, monkeypatch):
    """Some proxies put finish_reason "stop" on every chunk (gcli2api's OpenAI endpoint, Gemini's
    long pieces seconds apart): text after a finish_reason says it was none, but each piece only
    started the grace again, and a pause longer than it between two pieces ended the answer there,
    kept as whole. Once text has come after a finish_reason, the answer waits as any other does."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        watchers = watcher_polls(monkeypatch)
        taken = pieces_taken(monkeypatch, 3)  # piece n's chunk has been taken: the stream waits for more
        server.chat(Reply(pieces=[finishing_piece("Hel")],
                          held=[finishing_piece("lo"), finishing_piece("!") + b"data: [DONE]\n\n"]))  # fmt: skip
        got: list = []
        reader = start_worker(lambda: got.append(answer(conv)), "test-reader")
        assert taken[0].wait(CONNECTING_WAIT_S)
        server.go_on.release()
        assert taken[1].wait(CONNECTING_WAIT_S)  # "lo" came within the grace
        clock.now += 10 * answer_bounds.FINISHED_GRACE_S  # then "!" comes well past it
        polled_twice(watchers)  # the watcher, if any, has looked at the clock since
        server.go_on.release()
        reader.join(CONNECTING_WAIT_S)
        text, final = got[0]
        assert text == "Hello!" and final["finish_reason"] == "stop", (text, final)


def test_a_finish_reason_on_every_chunk_keeps_the_answer_whole_past_a_first_gap_longer_than_the_grace(
    watcher_clock, monkeypatch
):
    """A proxy that puts finish_reason "stop" on every chunk from the first (Gemini behind LiteLLM
    or gcli2api, long pieces seconds apart), and the second piece comes later than the grace: the
    first piece's finish_reason started it, and the answer was cut after that piece, kept as whole.
    The chunk that brings the first text arms no grace (the next one tells whether its finish was
    one). A watcher runs all along (an answer_timeout), its polls counting the time that passes."""
    watchers = watcher_polls(monkeypatch)
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server, answer_timeout=100_000)
        waiting, = pieces_taken(monkeypatch, 1)  # the first piece's chunk is taken: the stream waits for more
        server.chat(Reply(pieces=[finishing_piece("Hel")], held=[finishing_piece("lo!") + b"data: [DONE]\n\n"]))
        got: list = []
        reader = start_worker(lambda: got.append(answer(conv)), "test-reader")
        assert waiting.wait(CONNECTING_WAIT_S)
        watcher_clock.step = 0.5  # a poll: half a second of the watcher's clock (within answer_bounds.MAX_POLL_S)
        for _ in range(int(4 * answer_bounds.FINISHED_GRACE_S / watcher_clock.step)):  # a gap of 4 graces
            polled_twice(watchers)
        watcher_clock.step = 0.0
        server.go_on.release()
        reader.join(CONNECTING_WAIT_S)
        text, final = got[0]
        assert text == "Hello!" and final["finish_reason"] == "stop", (text, final)
        assert conv.turns[-1].reply == "Hello!"


# ---- the setting, and what the user sees ---------------------------------------------------------


@pytest.mark.parametrize(("text", "accepted"), [("0", True), ("0.5", True), ("86400", True), ("-1", False),
                                                ("86401", False), ("nan", False), ("inf", False)])  # fmt: skip
def test_answer_timeout_is_range_checked(text, accepted):
    settings = Settings()
    if accepted:
        settings.set("remote.answer_timeout", text)
        assert settings.remote.answer_timeout == float(text)
        return
    with pytest.raises(Exception, match=r"answer_timeout.*must be") as err:
        settings.set("remote.answer_timeout", text)
    assert "\n" not in str(err.value)


def test_the_app_says_why_the_answer_stopped_and_goes_on(tmp_path):
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply.sse(piece("x") * 5000 + STOP), Reply.sse(piece("ok") + STOP))
        overrides = {"generation.max_new_tokens": MAX_NEW, "remote.server": server.url}
        settings = load_settings(os.devnull, env={}, overrides=overrides)
        conv = RemoteConversation.connect(server.url, params=sampling_params(settings))
        out = io.StringIO()
        app = App(conv, settings, Console(file=out, width=300, color_system=None), cwd=tmp_path)
        assert app.handle_line("first") == OK
        assert ("[stopped: the server sent more than the 8 tokens asked for (does it ignore max_tokens?); the answer is "
                "cut there; /retry answers again, /undo removes it]") in out.getvalue()  # fmt: skip
        assert "stopped at max_new_tokens" not in out.getvalue()
        assert app.handle_line("second") == OK
        assert [t.reply for t in app.session.turns] == ["x" * PIECES, "ok"]


def one_shot(url: str, home: Path, *more: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(home)}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--server", url, "--max-new-tokens", "8",
                           "--no-stats", "-p", "hi", *more], input="", capture_output=True, text=True, env=env,
                          timeout=300, cwd=home)  # fmt: skip


def test_a_one_shot_run_against_an_endless_server_ends_with_what_arrived(tmp_path):
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[piece("x")], end="endless"))
        run = one_shot(server.url, tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "x" * PIECES + "\n"
        assert run.stderr == ("internvl-chat: warning: stopped: the server sent more than the 8 tokens asked for (does it "
                              "ignore max_tokens?); the answer is cut there\n")  # fmt: skip


def test_one_shot_json_says_the_client_cut_the_answer(tmp_path):
    """A program reading --json saw finish_reason "length" (as for an honest answer of the length
    asked for) and could not tell that the client cut it: the stderr warning is for a person."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[piece("x")], end="endless"), Reply.sse(piece("w") * MAX_NEW + LENGTH))
        cut = one_shot(server.url, tmp_path, "--json")
        whole = one_shot(server.url, tmp_path, "--json")
    assert cut.returncode == 0 and whole.returncode == 0, cut.stderr + whole.stderr
    out = json.loads(cut.stdout)
    assert out["text"] == "x" * PIECES and out["finish_reason"] == "length"
    assert out["note"] == ("the server sent more than the 8 tokens asked for (does it ignore max_tokens?); "
                           "the answer is cut there")  # fmt: skip
    out = json.loads(whole.stdout)
    assert (out["text"], out["finish_reason"], out["note"]) == ("w" * MAX_NEW, "length", None)


def test_a_one_shot_answer_broken_off_ends_its_line_before_the_error(tmp_path):
    """The partial answer is on stdout already: without a line break there, the error line that
    follows on a terminal read `Hellinternvl-chat: error: …`."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply(pieces=[piece("Hell")], end="cut"))
        run = one_shot(server.url, tmp_path)
        assert run.returncode == 1
        assert run.stdout == "Hell\n"
        assert run.stderr.startswith("internvl-chat: error: the connection to ") and run.stderr.count("\n") == 1


def test_shutting_a_clients_sockets_survives_a_connection_added_meanwhile():
    """The watcher threads read the client's sockets while the thread making requests may add one:
    the set's iteration then fails ("Set changed size during iteration"), and the socket that was to
    be shut stayed open (a deadline or a late head waited on)."""
    import socket
    import weakref

    from internvl_chat.chat import remote_sockets

    class Changing(weakref.WeakSet):
        failures = 1

        def __iter__(self):
            if Changing.failures:
                Changing.failures -= 1
                raise RuntimeError("Set changed size during iteration")
            return super().__iter__()

    a, b = socket.socketpair()
    with a, b:
        sockets = Changing([a])
        remote_sockets.shut_all(sockets)
        assert b.recv(1) == b""  # a was shut: its peer reads the end


def ends_whole_after_the_grace(events, watcher_clock) -> None:
    """The answer "Done." from a stream that then stays open ends after the finish's grace, not at
    the read timeout, whole and with the server's usage."""
    assert next(events)["text"] == "Done."
    finished_at, watcher_clock.armed = watcher_clock.now, WATCH_STEP_S  # from the reader's next read
    final = list(events)[-1]
    waited, watcher_clock.step = watcher_clock.now - finished_at, 0.0
    assert answer_bounds.FINISHED_GRACE_S <= waited < READ_TIMEOUT_S, f"the finished answer waited {waited:g} s"
    assert final["finish_reason"] == "stop" and final["note"] is None and final["usage"] == SERVER_USAGE


def test_a_one_chunk_answer_with_its_finish_reason_ends_after_the_grace_once_a_textless_chunk_follows(watcher_clock):
    """The whole text in the one chunk with its finish_reason (a one-token answer; a proxy that
    packs an answer in one chunk), then the usage chunk, then the stream stays open: that chunk
    arms no grace (a proxy may put one on every chunk), but the next one bringing no text shows the
    finish was one, as a later finish_reason's empty chunk does. It waited for the read timeout."""
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply.sse(GOOD))
        conv = RemoteConversation.connect(server.url, timeout=READ_TIMEOUT_S, params=SamplingParams(max_new_tokens=MAX_NEW),
                                          answer_timeout=1000)  # fmt: skip
        list(conv.ask("first"))
        server.chat(Reply(pieces=[finishing_piece("Done.") + USAGE], end="hang"))
        events = conv.ask("second")
        ends_whole_after_the_grace(events, watcher_clock)
        goes_on(conv, server)


def test_a_finish_reason_sent_again_and_again_does_not_stretch_the_grace(clock, monkeypatch):
    """After the finish_reason, a server (hostile, or looping) that sends it again, in a chunk without
    text, every few seconds, never [DONE]: each one started the grace over, so the finished answer
    and the prompt were held for as long as it went on (up to the events' bound, hours, or
    answer_timeout). The grace counts from the first finish."""
    watchers = watcher_polls(monkeypatch)
    again = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        taken = pieces_taken(monkeypatch, 2)  # piece n's chunk has been taken: the stream waits for more
        server.chat(Reply(pieces=[FINISHED], held=[again, again, piece(" late") + STOP]))
        got: list = []
        reader = start_worker(lambda: got.append(answer(conv)), "test-reader")
        assert taken[0].wait(CONNECTING_WAIT_S)
        for _ in range(2):  # two of the grace's three seconds waited, one poll seeing each
            clock.now += 1.0
            polled_twice(watchers)
        server.go_on.release()
        assert taken[1].wait(CONNECTING_WAIT_S)  # the finish_reason again
        clock.now += 1.0  # the third second: the grace is over
        polled_twice(watchers)
        server.go_on.release(2)
        reader.join(CONNECTING_WAIT_S)
        text, final = got[0]
        assert text == "Done." and final["finish_reason"] == "stop", (text, final)


def test_a_finish_reason_before_any_text_leaves_the_grace_to_the_real_one(watcher_clock):
    """A proxy's finish_reason on the role's first chunk (before any text), then the text, then the
    real finish_reason, then the stream stays open: the text after the early one marked the answer
    as one whose finish_reason finishes nothing, and the real one waited for the read timeout. Only
    a finish_reason that came with or after text is taken back by text after it."""
    last = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    with FakeServer(fixture("vllm/models.json")) as server:
        server.chat(Reply.sse(GOOD))
        conv = RemoteConversation.connect(server.url, timeout=READ_TIMEOUT_S, params=SamplingParams(max_new_tokens=MAX_NEW),
                                          answer_timeout=1000)  # fmt: skip
        list(conv.ask("first"))
        server.chat(Reply(pieces=[PREMATURE + piece("Done.") + last + USAGE], end="hang"))
        events = conv.ask("second")
        ends_whole_after_the_grace(events, watcher_clock)
        goes_on(conv, server)


def test_a_finish_reason_before_any_text_does_not_make_a_broken_off_answer_whole():
    """A proxy's finish_reason on the role's first chunk, then some text, then the connection closes
    without the answer's end: the early finish_reason was taken as the answer's, and the broken-off
    answer was kept as a whole "stop" one, with no note. Text after it shows it finished nothing."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply(pieces=[PREMATURE + piece("Hel")], end="cut"))
        text, final = answer(conv)
        assert text == "Hel"
        assert final["finish_reason"] == "error" and "the answer is cut there" in final["note"], final
