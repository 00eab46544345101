"""A server's answer that breaks off after some of its text came (the server died or reset the
connection, the chunked body was cut, the stream ended without finish_reason or [DONE], an error
event, finish_reason "error" or "abort"): the text the user saw is kept, finish_reason "error",
with a one-line note saying what happened (REPL: `[stopped: …]`; one-shot: an error line on
stderr, exit 1; `--json`: `note`); the turn saves and loads again. With no text yet it is one
error line and the conversation is unchanged. Real local HTTP servers (remote_helpers.FakeServer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from app_helpers import make_remote_app
from remote_helpers import FakeServer, Reply, fixture

from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.errors import RemoteError
from internvl_chat.ui.app import ERROR, OK

REPO = Path(__file__).resolve().parent.parent
GOOD = fixture("vllm/stream.sse")  # "A red" " circle" " on white.\n", finish_reason stop, [DONE]
UNFINISHED = GOOD[: GOOD.index(b"\n\n", GOOD.index(b"on white")) + 2]  # whole events up to " on white.\n"
URL = r"http://127\.0\.0\.1:\d+/v1"


def event(delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


def ended(reason: str) -> bytes:
    return event({"content": "A red"}) + event({}, reason) + b"data: [DONE]\n\n"


BROKEN = [  # (reply, what the note says happened)
    (Reply.sse(UNFINISHED), r"the server closed the stream before the answer finished"),
    # reset once the client has read some text (an RST drops what the client has not read yet)
    (Reply(pieces=[UNFINISHED], held=[b""], end="reset"), rf"the connection to {URL} broke in the middle of the answer \(.+\)"),
    (Reply.sse(UNFINISHED, end="cut"), rf"the connection to {URL} broke in the middle of the answer \(.+\)"),
    (Reply.sse(fixture("lmdeploy/stream_error.sse")),
     r"the server stopped the answer with an error: the engine stopped: out of KV cache blocks \(server_error\)"),
    (Reply.sse(ended("error")), r"the server ended the answer with finish_reason 'error'"),
    (Reply.sse(ended("abort")), r"the server ended the answer with finish_reason 'abort'"),
    (Reply.sse(event({"content": "A red"}) + b'data: {"choices": 7}\n\n'),
     r"the server sent a stream chunk whose choices is not a list \(7\)"),
]
BROKEN_IDS = ["no-finish", "reset", "cut", "error-event", "finish-error", "finish-abort", "garbage"]


def connected(server: FakeServer) -> RemoteConversation:
    """A conversation with one whole turn."""
    server.chat(Reply.sse(GOOD))
    conv = RemoteConversation.connect(server.url, timeout=120, params=SamplingParams(max_new_tokens=8))
    list(conv.ask("first"))
    return conv


@pytest.mark.parametrize(("reply", "what"), BROKEN, ids=BROKEN_IDS)
def test_an_answer_broken_off_keeps_what_came_with_a_note(reply, what):
    """It raised "…; the partial answer was discarded; ask again": the text the user had watched
    stream vanished."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(reply, Reply.sse(GOOD))
        stream = conv.ask("second")
        events = [next(stream)]
        server.go_on.release()  # a reply with `held` pieces goes on: the client has read some text
        events += list(stream)
        shown = "".join(e["text"] for e in events)
        final = events[-1]
        assert shown and "A red circle on white.\n".startswith(shown)
        assert final["finish_reason"] == "error" and final["usage"] is None
        assert re.fullmatch(f"{what}; the answer is cut there", final["note"]), final["note"]
        assert [(t.user_text, t.reply, t.finish_reason) for t in conv.turns[1:]] == [("second", shown, "error")]
        assert conv.turns[1].answer_text == shown  # no mark: the note says it
        list(conv.ask("third"))  # the conversation goes on, the kept text resent as it came
        assert server.chat_bodies()[-1]["messages"][3] == {"role": "assistant", "content": shown}


def test_without_commands_the_note_says_to_ask_again():
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        conv.commands = False  # one-shot mode: no /retry
        server.chat(Reply.sse(UNFINISHED, end="cut"))
        final = list(conv.ask("second"))[-1]
        assert final["note"].endswith("; the answer is cut there; ask again")


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (Reply.sse(event({"role": "assistant", "content": ""}), end="reset"),  # the RST may drop the head too
         rf"^the connection to {URL} broke (in the middle of the answer|before the answer began) \(.+\); ask again$"),
        (Reply.sse(event({}, "error") + b"data: [DONE]\n\n"), r"^the server ended the answer with finish_reason 'error'; ask again$"),
        (Reply.sse(event({"content": ""}, None)), r"^the server closed the stream before the answer finished; ask again$"),
    ],
    ids=["reset", "finish-error", "no-finish"],
)
def test_broken_off_before_any_text_is_one_line_and_changes_nothing(reply, line):
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(reply)
        with pytest.raises(RemoteError, match=line):
            list(conv.ask("second"))
        assert [t.user_text for t in conv.turns] == ["first"]


def test_a_crlf_stream_cut_after_a_whole_event_keeps_that_event_s_text():
    """Events framed with CRLF (sse-starlette's default) were returned one read late: the last
    whole event before a cut was lost, its text missing from the kept answer."""
    crlf = (event({"content": "A red"}) + event({"content": " circle"})).replace(b"\n", b"\r\n")
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply.sse(crlf, end="cut"))
        final = list(conv.ask("second"))[-1]
        assert (final["finish_reason"], conv.turns[-1].reply) == ("error", "A red circle")


@pytest.mark.parametrize("end", ["reset", "cut"])
def test_a_connection_lost_after_the_server_said_finish_reason_keeps_the_whole_answer(end):
    """The answer was whole (finish_reason stop); only what follows it (the usage, [DONE]) was lost.
    It was refused as "broke in the middle of the answer; the partial answer was discarded"."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply(pieces=[event({"content": "Whole."}) + event({}, "stop")], held=[b""], end=end))
        stream = conv.ask("second")
        events = [next(stream)]
        server.go_on.release()  # now the connection is lost (an RST drops what the client has not read)
        events += list(stream)
        assert "".join(e["text"] for e in events) == "Whole."
        assert (events[-1]["finish_reason"], events[-1]["note"], conv.turns[-1].reply) == ("stop", None, "Whole.")


def test_retry_broken_off_keeps_what_came_in_place_of_the_old_answer():
    """As a cancelled or cut /retry does: the conversation holds the answer the user saw last."""
    with FakeServer(fixture("vllm/models.json")) as server:
        conv = connected(server)
        server.chat(Reply.sse(UNFINISHED, end="cut"))
        final = list(conv.retry())[-1]
        assert final["finish_reason"] == "error"
        assert [(t.user_text, t.reply) for t in conv.turns] == [("first", "A red circle on white.\n")]


# ---- the app: REPL and --script, /save and /load ---------------------------------------------------


def test_the_app_keeps_a_broken_off_answer_says_so_and_saves_and_loads_it(tmp_path):
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(GOOD), Reply.sse(UNFINISHED, end="cut"), Reply.sse(GOOD))  # cut: no RST drops data
        app, out = make_remote_app(fake.url, tmp_path, width=300)
        assert app.handle_line("first") == OK
        assert app.handle_line("second") == ERROR  # kept, but a --script counts the line as failed
        lines = out.getvalue().splitlines()
        assert not [x for x in lines if x.startswith("error:")], out.getvalue()
        (stopped,) = [x for x in lines if x.startswith("[stopped:")]
        assert re.fullmatch(rf"\[stopped: the connection to {URL} broke in the middle of the answer \(.+\); the answer is "
                            r"cut there; /retry answers again, /undo removes it\]", stopped), stopped  # fmt: skip
        assert [t.reply for t in app.session.turns] == ["A red circle on white.\n"] * 2
        assert app.handle_line("/stats") == OK and re.search(r"finish\s+error", out.getvalue())
        assert app.handle_line(f"/save {tmp_path / 'talk.json'}") == OK
        saved = json.loads((tmp_path / "talk.json").read_text())
        assert saved["messages"][3] == {"role": "assistant", "text": "A red circle on white.\n", "finish_reason": "error"}

        again, out = make_remote_app(fake.url, tmp_path, width=300)
        assert again.handle_line(f"/load {tmp_path / 'talk.json'}") == OK, out.getvalue()
        # the last answer broke off: said again, as the file keeps no "[stopped: …]" line (it said nothing)
        assert "(cut short: it broke off with an error; /retry answers again, /undo removes it)" in out.getvalue()
        assert [(t.user_text, t.reply, t.finish_reason) for t in again.session.turns] == [
            ("first", "A red circle on white.\n", "stop"), ("second", "A red circle on white.\n", "error")]  # fmt: skip
        assert again.handle_line("third") == OK
        assert [m["content"] for m in fake.chat_bodies()[-1]["messages"]][:4] == [
            "first", "A red circle on white.\n", "second", "A red circle on white.\n"]  # fmt: skip


def test_an_export_marks_the_server_answers_cut_short_also_after_save_and_load(tmp_path):
    """A server's answer that broke off, hit the length limit or was cancelled was exported as if
    it were whole; each now ends with a line that says why it stopped, a whole one is unchanged."""
    length = GOOD.replace(b'"finish_reason":"stop"', b'"finish_reason":"length"')
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(GOOD), Reply.sse(UNFINISHED, end="cut"), Reply.sse(length), Reply.sse(GOOD))
        app, out = make_remote_app(fake.url, tmp_path, width=300)
        assert app.handle_line("first") == OK and app.handle_line("second") == ERROR
        assert app.handle_line("third") == OK
        cancel = threading.Event()
        events = app.session.ask("fourth", cancel=cancel)  # as Ctrl-C does while it streams
        assert next(events)["text"] == "A red"
        cancel.set()
        assert list(events)[-1]["finish_reason"] == "cancelled"
        expected = [
            "A red circle on white.",
            "A red circle on white.\n\n*(answer cut short: it broke off with an error)*",
            "A red circle on white.\n\n*(answer cut short: it reached the length limit)*",
            "A red\n\n*(answer cut short: cancelled by the user)*",  # its " [cancelled]" said once, by the mark
        ]
        assert app.handle_line(f"/export {tmp_path / 'now.md'}") == OK, out.getvalue()
        assert _assistant_parts((tmp_path / "now.md").read_text()) == expected
        assert app.handle_line(f"/save {tmp_path / 'talk.json'}") == OK

        again, out = make_remote_app(fake.url, tmp_path, width=300)
        assert again.handle_line(f"/load {tmp_path / 'talk.json'}") == OK, out.getvalue()
        assert "→ “A red” (cut short: cancelled by the user)" in out.getvalue()  # /load's last turn says it too
        assert again.handle_line(f"/export {tmp_path / 'loaded.md'}") == OK, out.getvalue()
        assert _assistant_parts((tmp_path / "loaded.md").read_text()) == expected


def _assistant_parts(md: str) -> list[str]:
    """Each answer of an export as written, up to the next turn."""
    return [part.split("\n## User\n")[0].strip("\n") for part in md.split("\n## Assistant\n")[1:]]


def test_an_answer_cut_after_its_first_piece_claims_no_decode_speed(tmp_path):
    """The server killed after the answer's first piece: no decode was measured, but the line
    under the answer said "decode 0.0 tok/s" and /stats "decode 0 tokens in 0.000 s (0.0 tok/s)"."""
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(event({"content": "A red"}), end="cut"))
        app, out = make_remote_app(fake.url, tmp_path, width=300)
        assert app.handle_line("What is it?") == ERROR
        assert app.handle_line("/stats") == OK
    text = out.getvalue()
    assert re.search(r"^ttft [\d.]+ s · context ≈", text, re.M), text  # the stats line
    assert "tok/s" not in text and not re.search(r"^decode", text, re.M), text
    assert re.search(r"^time to first token\s+[\d.]+ s$", text, re.M), text


def test_a_broken_off_answer_saved_from_a_server_loads_into_the_local_model(loaded, tmp_path):
    """Sessions saved either way load either way: the local model reads the text that came."""
    from app_helpers import make_app

    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(UNFINISHED, end="cut"))
        app, _ = make_remote_app(fake.url, tmp_path, width=300)
        assert app.handle_line("What is it?") == ERROR
        assert app.handle_line(f"/save {tmp_path / 'talk.json'}") == OK
    here, out = make_app(loaded, tmp_path)
    assert here.handle_line(f"/load {tmp_path / 'talk.json'}") == OK, out.getvalue()
    (turn,) = here.session.turns
    assert (turn.answer_text, turn.finish_reason) == ("A red circle on white.\n", "error")
    assert here.handle_line("And then?") == OK and len(here.session.turns) == 2


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(home)}
    for name in ("NO_COLOR", "XDG_STATE_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", *args], input="", capture_output=True,
                          text=True, env=env, timeout=300, cwd=home)  # fmt: skip


def test_a_script_keeps_the_broken_off_answer_counts_the_line_and_loads_it_again(tmp_path):
    (tmp_path / "talk.txt").write_text("first\nsecond\n/save talk.json\n")
    (tmp_path / "more.txt").write_text("/load talk.json\nthird\n")
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(GOOD), Reply.sse(UNFINISHED, end="cut"), Reply.sse(GOOD))
        run = cli(tmp_path, "--server", fake.url, "--no-stats", "--plain", "--script", "talk.txt")
        assert run.returncode == 1 and run.stderr == "internvl-chat: 1 script line failed (line 2)\n", run.stderr
        assert re.search(r">>> second\n+A red circle on white\.\n+\[stopped: the connection to .* broke in the middle of the "
                         r"answer .*; the answer is cut there; /retry answers again, /undo removes it\]\n", run.stdout), run.stdout
        assert "saved 2 turns" in run.stdout
        more = cli(tmp_path, "--server", fake.url, "--no-stats", "--plain", "--script", "more.txt")
        assert more.returncode == 0 and "loaded 2 turns" in more.stdout, more.stdout + more.stderr
        assert [m["content"] for m in fake.chat_bodies()[-1]["messages"]] == [
            "first", "A red circle on white.\n", "second", "A red circle on white.\n", "third"]  # fmt: skip


# ---- one-shot ------------------------------------------------------------------------------------


def test_one_shot_prints_what_came_and_fails_with_the_note(tmp_path):
    """It printed the text, then "…; the partial answer was discarded": the text was on stdout all the same."""
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(UNFINISHED, end="cut"))
        run = cli(tmp_path, "--server", fake.url, "--no-stats", "-p", "hi")
    assert run.returncode == 1  # a program reading stdout learns that the answer is not whole
    assert run.stdout == "A red circle on white.\n\n"
    assert re.fullmatch(rf"internvl-chat: error: the connection to {URL} broke in the middle of the answer \(.+\); "
                        r"the answer is cut there; ask again\n", run.stderr), run.stderr  # fmt: skip


def test_one_shot_json_holds_what_came_and_the_note(tmp_path):
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(ended("abort")))
        run = cli(tmp_path, "--server", fake.url, "--no-stats", "-p", "hi", "--json")
    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert (out["text"], out["finish_reason"]) == ("A red", "error")
    assert out["note"] == "the server ended the answer with finish_reason 'abort'; the answer is cut there; ask again"
    assert run.stderr == f"internvl-chat: error: {out['note']}\n"
