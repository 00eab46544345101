"""The terminal app with `--server`: one-shot (`--json` too), `--script` and the REPL against
`internvl-chat serve` running in this process on 127.0.0.1 (the tiny checkpoint), compared with
the same runs on the local model; remote failures through the app; session files across the two.

Exactness: greedy answers through the server are the local model's, token for token (the server
keeps the ids it generated, so `worker.answers` gives them back by text).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from internvl_chat.chat import remote_http, remote_stream
from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.ui.app import ERROR, OK
from internvl_chat.ui.set_keys import runtime_keys
from app_helpers import make_remote_app, output
from media_helpers import textured_rgb
from remote_helpers import FakeServer, Reply, closed_port, fixture, refusing_port
from serve_support import RunningServer
from test_repl_pty import PROMPT_READY, Repl

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 3072
TIMEOUT = 300  # generous: a loaded 2-core machine can stall a child for minutes; a pass never waits for it


@pytest.fixture(scope="module")
def server(tiny_original):
    with RunningServer(tiny_original, max_context=CONTEXT, model_id="tiny") as running:
        yield running


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote_app") / "photo.png"
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(path)  # 2×1 grid + thumbnail: 3 tiles
    return path


def app_env(home: Path) -> dict:
    """The app's environment: this checkout, no config file, `home` as HOME, nothing that picks a colour
    mode, state folder or server for it (test_remote_llamacpp.py runs the app so too)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(home)}
    for name in ("NO_COLOR", "XDG_STATE_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return env


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", *args], input="", capture_output=True,
                          text=True, env=app_env(home), timeout=TIMEOUT, cwd=home)  # fmt: skip


def local(model: Path) -> tuple[str, ...]:
    return ("--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-context", str(CONTEXT))


# ---- one-shot ----------------------------------------------------------------------------------


def test_oneshot_json_through_serve_gives_the_local_greedy_tokens(server, tiny_original, picture, tmp_path):
    ask = ("--image", str(picture), "-p", "What is in the picture?", "--max-new-tokens", "12", "--json")
    here = cli(tmp_path, *local(tiny_original), *ask)
    there = cli(tmp_path, "--server", server.url, *ask)
    assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
    mine, theirs = json.loads(here.stdout), json.loads(there.stdout)
    assert theirs["token_ids"] is None  # a server does not send ids
    assert set(theirs) == set(mine) and theirs["note"] is None and mine["note"] is None  # one schema, nothing cut
    assert (theirs["text"], theirs["finish_reason"]) == (mine["text"], mine["finish_reason"])
    assert server.worker.answers.lookup(theirs["text"]) == mine["token_ids"]  # the very tokens, not only the text
    assert theirs["usage"]["prompt_tokens"] == mine["usage"]["prompt_tokens"]
    assert theirs["usage"]["completion_tokens"] == len(mine["token_ids"])
    assert {"ttft_s", "decode_tokens_per_s", "load_s", "server"} <= set(theirs["timing"])

    # streamed: the answer on stdout, the stats on stderr with the server's numbers labelled, no peak memory
    text = cli(tmp_path, "--server", server.url, *ask[:-1])
    assert text.returncode == 0 and text.stdout == mine["text"] + "\n"
    assert re.search(r"context ≈[\d,]+/3,072 \(\d+ %\) · server: prompt [\d,]+ tok \([\d,]+ cached\)$", text.stderr.strip())
    assert "peak" not in text.stderr


def test_oneshot_overflow_advice_names_flags_not_repl_commands(server, tiny_original, tmp_path):
    """One-shot mode has no REPL: /clear, /undo or /set cannot help there, the next run's flags can."""
    ask = ("-p", "Hi.", "--max-new-tokens", str(CONTEXT + 100))
    for run in (cli(tmp_path, *local(tiny_original), *ask), cli(tmp_path, "--server", server.url, *ask)):
        assert run.returncode != 0 and run.stdout == ""
        line = run.stderr.strip()
        assert "\n" not in line and "--max-new-tokens" in line, line
        assert not re.search(r"/(clear|undo|set|drop|system)\b|max_new_tokens", line), line


def test_local_model_flags_with_a_server_are_refused(tmp_path):
    run = cli(tmp_path, "--server", "http://127.0.0.1:9/v1", "--model", "somewhere", "-p", "hi")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("internvl-chat: error: --model is for a local model") and run.stderr.count("\n") == 1
    for url in ("http://alice:s3cret@127.0.0.1:9/v1", "ftp://alice:s3cret@host/v1", "http://alice:s3cret@host:x/v1"):
        run = cli(tmp_path, "--server", url, *(("--model", "somewhere") if url.startswith("http://alice:s3cret@127") else ()),
                  "-p", "hi")  # fmt: skip
        assert run.returncode == 2 and "alice" not in run.stderr and "s3cret" not in run.stderr, run.stderr  # never printed


def test_server_flags_without_a_server_are_refused(tmp_path):
    # they were ignored: the local model answered as if --dialect or --remote-model meant nothing
    run = cli(tmp_path, "--dialect", "vllm", "--remote-model", "x", "-p", "hi")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("internvl-chat: error: --remote-model, --dialect are for a server, but no server is set; "
                          "add --server URL, or drop them to run the model here\n")  # fmt: skip
    run = cli(tmp_path, "--api-key", "k", "--script", "-")
    assert run.returncode == 2 and run.stderr.startswith("internvl-chat: error: --api-key is for a server, but no server")


def test_compile_with_a_server_is_refused(tmp_path):
    run = cli(tmp_path, "--server", "http://127.0.0.1:9/v1", "--compile", "on", "-p", "hi")
    assert run.returncode == 2 and run.stderr.startswith("internvl-chat: error: --compile is for a local model")


def test_a_server_that_is_down_is_one_line(tmp_path):
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}/v1"
        (tmp_path / "hi.txt").write_text("hi\n", encoding="utf-8")  # an empty script is refused before connecting
        for args in (("-p", "hi"), ("--script", "hi.txt")):
            run = cli(tmp_path, "--server", url, *args)
            assert run.returncode == 1 and "Traceback" not in run.stderr
            assert re.fullmatch(rf"internvl-chat: error: cannot connect to {re.escape(url)} \(.*\); is the server running\? "
                                r"check --server\n", run.stderr)  # fmt: skip


def test_turns_through_serve_share_the_model_lists_connection(tiny_original, monkeypatch):
    """The client read each answer up to `data: [DONE]` and closed the connection with the body's
    last chunk unread: every turn made a new connection (a TCP and a TLS handshake to a distant
    server). It reads that end now: the connection of the model list carries every answer."""
    monkeypatch.setattr(remote_http, "KEEPALIVE_S", 600.0)  # a busy machine's pause between turns ends nothing
    monkeypatch.setattr(remote_stream, "DRAIN_S", 600.0)  # the body's end comes at once: never waited for
    with RunningServer(tiny_original, max_context=CONTEXT, keep_alive_timeout=600) as serve:
        conv = RemoteConversation.connect(serve.url, params=SamplingParams(max_new_tokens=4))
        connects: list[str] = []
        traced = conv.client.trace

        def trace(event: str, info: dict) -> None:
            if event.endswith(".connect_tcp.complete"):
                connects.append(event)
            traced(event, info)

        conv.client.trace = trace
        for n in range(3):
            assert list(conv.ask(f"Count to {n}."))[-1]["finish_reason"] in ("stop", "length")
        assert connects == []
        conv.close()


# ---- --script: a 4-turn conversation, and session files across the two -------------------------

def _answers(transcript: str) -> dict[str, str]:
    """message -> the answer printed under it (--no-stats: nothing else follows it)."""
    out = {}
    for entry in transcript.split("\n>>> ")[1:]:
        head, _, rest = entry.partition("\n")
        if not head.startswith("/"):
            out[head] = rest.rstrip("\n")
    return out


def test_four_turns_by_script_through_serve_equal_the_local_ones(server, tiny_original, picture, tmp_path):
    body = (f"/image {picture}\nWhat is in the picture?\nTell me more.\n/undo\nTell me more.\nAnd the colours?\n"
            "/retry\nThanks, bye.\n/save SAVED\n")  # fmt: skip
    runs = {}
    for name, flags in (("local", local(tiny_original)), ("remote", ("--server", server.url))):
        (tmp_path / f"{name}.txt").write_text(body.replace("SAVED", str(tmp_path / f"{name}.json")))
        run = cli(tmp_path, *flags, "--max-new-tokens", "12", "--no-stats", "--plain", "--script", f"{name}.txt")
        assert run.returncode == 0, run.stdout + run.stderr
        runs[name] = run.stdout
    here, there = _answers(runs["local"]), _answers(runs["remote"])
    assert list(here) == ["What is in the picture?", "Tell me more.", "And the colours?", "Thanks, bye."]
    assert there == here and all(here.values())
    assert "≈" in runs["remote"] and "≈" not in runs["local"]  # the attach line: estimated tokens

    mine, theirs = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert mine["backend"] == {"kind": "local"}
    assert theirs["backend"] == {"kind": "remote", "server": server.url + "/v1", "model": "tiny", "dialect": "internvl-chat"}
    texts = lambda data: [m["text"] for m in data["messages"]]  # noqa: E731
    assert texts(theirs) == texts(mine) and len(mine["messages"]) == 8
    for message in theirs["messages"][1::2]:  # the server's counts, kept with each answer; no ids
        assert "token_ids" not in message and message["usage"]["completion_tokens"] >= 1
    assert all(message["token_ids"] == server.worker.answers.lookup(message["text"]) for message in mine["messages"][1::2])

    # a local session loads into the remote app and goes on exactly as in the local app (the texts are
    # enough: the server knows its own replies' ids by their text)
    (tmp_path / "more.txt").write_text(f"/load {tmp_path / 'local.json'}\n/context\nOne more thing?\n")
    more = ("--max-new-tokens", "12", "--no-stats", "--plain", "--script", "more.txt")
    here = cli(tmp_path, *local(tiny_original), *more)
    there = cli(tmp_path, "--server", server.url, *more)
    assert here.returncode == 0 and there.returncode == 0, here.stdout + there.stdout
    assert "loaded 4 turns" in there.stdout and "(it was saved with " in there.stdout
    assert _answers(there.stdout)["One more thing?"] == _answers(here.stdout)["One more thing?"]

    # a remote session in the local app: its answers are tokenized again, unless their text cannot give
    # the tokens back (the tiny model's random answers hold bytes that were not UTF-8)
    (tmp_path / "back.txt").write_text(f"/load {tmp_path / 'remote.json'}\nOne more thing?\n")
    back = cli(tmp_path, *local(tiny_original), "--max-new-tokens", "12", "--no-stats", "--plain", "--script", "back.txt")
    if any("\ufffd" in m["text"] for m in theirs["messages"][1::2]):
        assert back.returncode == 1 and re.search(r"error: answer \d in .*remote\.json was saved from a server without its "
                                                  r"tokens, .*; continue it with --server, or start anew\n", back.stdout)  # fmt: skip
    else:
        assert back.returncode == 0 and "loaded 4 turns" in back.stdout, back.stdout


# ---- failures through the app (a scripted server): one line each, the conversation survives -----

GOOD = fixture("vllm/stream.sse")


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (Reply.json(fixture("lmdeploy/error_flat.json"), 401), r"error: the server answered 401 Unauthorized: .*; check --api-key .*"),
        # before any text came (after some, the text is kept: tests/test_remote_broken.py)
        (Reply.sse(fixture("lmdeploy/stream_error.sse").split(b"\n\n", 1)[1]),
         r"error: the server stopped the answer with an error: .*; ask again"),
        (Reply.sse(GOOD[: GOOD.index(b"\n\n") + 2], end="reset"), r"error: the connection to .* broke .*; ask again"),
    ],
    ids=["401", "error-at-once", "reset-before-text"],
)
def test_remote_failures_are_one_line_and_the_conversation_goes_on(reply, line, tmp_path):
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(Reply.sse(GOOD), reply, Reply.sse(GOOD))
        app, out = make_remote_app(fake.url, tmp_path)
        assert app.handle_line("first") == OK
        assert app.handle_line("second") == ERROR
        errors = [x for x in out.getvalue().splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and re.fullmatch(line, errors[0]), out.getvalue()
        assert [t.user_text for t in app.session.turns] == ["first"]
        assert app.handle_line("third") == OK
        assert [t.user_text for t in app.session.turns] == ["first", "third"]
        # the failed turn was never part of the conversation: the third request resends only the first
        assert [m["content"] for m in fake.chat_bodies()[-1]["messages"] if m["role"] == "user"] == ["first", "third"]


def test_system_default_with_a_server_sends_none_again(tmp_path):
    # the server's chat template holds the model's default: `/system --default` sends no system message
    with FakeServer(fixture("vllm/models.json")) as fake:
        fake.chat(*[Reply.sse(GOOD)] * 3)
        app, out = make_remote_app(fake.url, tmp_path)
        app.handle_line("/system Be brief.")
        assert app.handle_line("first") == OK
        assert fake.chat_bodies()[-1]["messages"][0] == {"role": "system", "content": "Be brief."}
        output(out)
        assert app.handle_line("/system --default") == OK
        assert output(out) == "system message unset: none is sent, so the server's chat template decides; the 1 turn so far now follows it\n"
        assert app.session.system_message is None and app.settings.system.message is None
        assert app.handle_line("second") == OK
        assert [m["role"] for m in fake.chat_bodies()[-1]["messages"]] == ["user", "assistant", "user"]
        app.handle_line("/set system.message")
        assert output(out).endswith("system.message = (not set: none is sent, the server decides)  (from /system --default)\n")
        assert app.handle_line(f"/save {tmp_path / 'talk.json'}") == OK
        assert json.loads((tmp_path / "talk.json").read_text())["system_message"] is None  # none sent: the server's default
        app.handle_line("/system Be brief.")
        output(out)
        assert app.handle_line(f"/load {tmp_path / 'talk.json'}") == OK
        # the file holds no system message: no saved text is "in use"
        assert "\nthe session was saved with no system message: none is sent, so the server's chat template decides\n" in output(out)
        assert app.session.system_message is None and app.settings.system.message is None
        assert app.handle_line("third") == OK
        assert fake.chat_bodies()[-1]["messages"][0]["role"] == "user"
        # a local session saved after `/system ''` holds "": a server is sent none, as with None
        data = json.loads((tmp_path / "talk.json").read_text())
        (tmp_path / "talk.json").write_text(json.dumps({**data, "system_message": ""}))
        app.handle_line("/system Be brief.")
        output(out)
        assert app.handle_line(f"/load {tmp_path / 'talk.json'}") == OK
        assert "\nthe session was saved with no system message: none is sent, so the server's chat template decides\n" in output(out)
        assert app.session.system_message is None and app.settings.system.message is None


def test_settings_of_the_server_cannot_change_while_the_app_runs(tmp_path):
    with FakeServer(fixture("vllm/models.json")) as fake:
        app, out = make_remote_app(fake.url, tmp_path)
        for line in ("/set remote.server http://elsewhere:8000/v1", "/set remote.api_key k", "/set serve.port 9",
                     "/set max_context 100"):  # fmt: skip
            assert app.handle_line(line) == ERROR
        assert output(out).split("\n")[:-1] == [
            "error: remote.server is read at start; restart with --server URL",
            "error: remote.api_key is read at start; restart with --api-key KEY",
            "error: serve.port is read by internvl-chat serve when it starts; this chat does not use it",
            "error: model.max_context is for a local model; the answers here come from the server",
        ]
        assert app.settings.remote.server == fake.url
    assert not [key for key in runtime_keys() if key.startswith(("remote.", "serve.", "model."))]  # nor offered by Tab


def test_a_server_that_does_not_say_its_context(picture, tmp_path):
    """lmdeploy's model list has no context length: the app shows what it knows and never divides by it."""
    with FakeServer(fixture("lmdeploy/models.json")) as fake:
        stop = fixture("lmdeploy/stream.sse")
        fake.chat(Reply.sse(stop), Reply.sse(stop.replace(b'"finish_reason":"stop"', b'"finish_reason":"length"')))
        app, out = make_remote_app(fake.url, tmp_path)
        app.banner()
        assert "· context: the server's limit" in out.getvalue()
        assert app.session.max_context is None
        assert app.handle_line(f"/image {picture}") == OK
        assert "+ image photo.png 900×450 → 3 tiles · ≈771 tokens\n" in out.getvalue()  # no share of an unknown limit
        assert app._work_label(app.pending) == "reading the images …"
        assert app.handle_line("What is it?") == OK
        assert app.session.turns[0].media[0].prepared and app._work_label(app.session.turns[0].media) == "thinking …"
        assert "context ≈1,848 · server: prompt 1,843 tok (1,792 cached)" in out.getvalue()  # the server's count
        assert app.handle_line("And?") == OK
        assert "[stopped at max_new_tokens (8); /set max_new_tokens N allows longer answers]" in out.getvalue()
        for line, shown in (("/context", "tokens used (the server's limit is not known)"), ("/stats", "context              ≈"),
                            ("/media", "nothing attached")):  # fmt: skip
            assert app.handle_line(line) == OK and shown in out.getvalue()



def test_an_answer_that_fills_the_servers_context_says_what_makes_room(tmp_path):
    """llama.cpp ends an answer with "length" when its context is full; --max-context (refused with
    --server) is not what makes room there."""
    models = json.loads(fixture("vllm/models.json"))
    models["data"][0]["max_model_len"] = 1848  # what the recorded usage adds up to
    with FakeServer(json.dumps(models).encode()) as fake:
        fake.chat(Reply.sse(GOOD.replace(b'"finish_reason":"stop"', b'"finish_reason":"length"')))
        app, out = make_remote_app(fake.url, tmp_path)
        assert app.handle_line("Tell me everything.") == OK
        assert "[stopped: the context is full; /undo, /clear or a server started with a larger context make room]" \
            in out.getvalue()
        assert "--max-context" not in out.getvalue()


# ---- the REPL in a pseudo-terminal --------------------------------------------------------------


class RemoteRepl(Repl):
    """test_repl_pty's Repl, started with flags of our own (--server, no --model)."""

    def __init__(self, home: Path, *args: str):
        env = {**app_env(home), "TERM": "xterm-256color", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn(sys.executable, ["-m", "internvl_chat.cli", *args], env=env, dimensions=(50, 220),
                                   encoding="utf-8", timeout=TIMEOUT, cwd=str(home))  # fmt: skip
        self.record()


STATS = r"ttft [\d.]+ s · decode [\d.,]+ tok/s \(server\) · context ≈[\d,]+/3,072 \(\d+ %\) · server: prompt [\d,]+ tok"


def test_the_repl_through_serve_cancel_retry_undo_and_save(server, picture, tmp_path):
    repl = RemoteRepl(tmp_path, "--server", server.url, "--max-new-tokens", "40", "--plain")
    repl.expect(rf"internvl-chat · tiny · {re.escape(server.url)}/v1 \(internvl-chat serve\) · context 3,072 tokens")
    repl.child.expect_exact(PROMPT_READY)
    repl.run(f"/image {picture}", r"\+ image photo\.png 900×450 → 3 tiles · ≈771 tokens · context ≈\d+ %")
    repl.run("What is in the picture?", STATS)
    repl.run("/set remote.server http://elsewhere/v1", r"error: remote\.server is read at start; restart with --server URL")

    # Ctrl-C while the answer streams: the stream is closed, the partial answer kept and marked
    repl.run("/set max_new_tokens 1500", r"generation\.max_new_tokens = 1500")
    repl.interrupt_answer("Tell me a long story.")  # pressed while the answer still streams
    repl.child.expect_exact(PROMPT_READY)
    repl.run("/set max_new_tokens 40", r"= 40")
    repl.run("/context", r"turn 2: “Tell me a long story\.” \(answer [\d,]+\)\s+≈[\d,]+")
    repl.run("/stats", r"finish\s+cancelled")
    repl.run("/retry", STATS)
    repl.run("/stats", r"server reports\s+prompt [\d,]+ tokens · [\d,]+ cached · answer [\d,]+ tokens")
    repl.run("And now?", STATS)
    repl.run("/undo", r"removed turn 3: “And now\?”")
    repl.run(f"/save {tmp_path / 'talk.json'}", r"saved 2 turns")
    repl.child.send("/exit\r")
    repl.child.expect(pexpect.EOF)
    repl.child.close()
    assert repl.child.exitstatus == 0

    saved = json.loads((tmp_path / "talk.json").read_text())
    assert saved["backend"]["kind"] == "remote" and saved["settings"]["remote"]["api_key"] == ""
    answers = saved["messages"][1::2]
    assert answers[1]["finish_reason"] in ("stop", "length")  # /retry replaced the cancelled answer
    assert answers[1]["usage"]["completion_tokens"] <= 40


DEMO_MODEL = REPO / "internvl_chat" / "demo_model"


def _serve(script: list[str], port: int, home: Path) -> subprocess.Popen:
    """`serve` of the demo model in its own process on `port`, once it answers /health."""
    argv = [sys.executable, *script, "--model", str(DEMO_MODEL), "--port", str(port), "--device", "cpu",
            "--dtype", "float32", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(argv, env=app_env(home), cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("serve did not start") from None
            time.sleep(0.1)


def _shown(output: str) -> str:
    """The text of terminal output, its control sequences left out."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output).strip()


def test_the_repl_through_a_server_killed_mid_answer_then_restarted_retries_and_goes_on(picture, tmp_path):
    """SIGKILL of the server in the middle of an answer: the text shown is kept with one line
    saying so, the prompt comes back; the server restarted on the same port (its KV cache gone),
    /retry answers again from the conversation resent whole, a next turn works, /undo removes it.
    The first server stalls after its answer's first piece (tests/stalled_serve.py): the kill
    lands mid-answer on any machine, with no race."""
    port = closed_port()
    servers = [_serve([str(REPO / "tests" / "stalled_serve.py")], port, tmp_path)]
    try:
        repl = RemoteRepl(tmp_path, "--server", f"127.0.0.1:{port}", "--plain", "--max-new-tokens", "12")
        repl.child.expect_exact(PROMPT_READY)
        repl.run(f"/image {picture}", r"\+ image photo\.png")
        repl.enter("What is in the picture?")
        # --plain: no spinner; the answer's first piece (past any cursor sequence), then nothing more
        repl.child.expect(r"\A(?:\x1b\[[0-9;?]*[A-Za-z]|\s)*[^\s\x1b]")
        first = repl.child.after + repl.child.buffer
        servers[0].kill()
        servers[0].wait()
        repl.expect(r"\[stopped: the connection to http://127\.0\.0\.1:\d+/v1 broke in the middle of the answer")
        first = _shown(first + repl.child.before)
        repl.prompt()
        repl.run("/context", r"turn 1: image photo\.png, “What is in the picture\?” \(media [\d,]+ · answer")
        repl.run("/stats", r"finish\s+error")

        servers.append(_serve(["-m", "internvl_chat", "serve"], port, tmp_path))  # the same port, a new cache
        repl.enter("/retry")
        repl.expect(r"server: prompt [\d,]+ tok \(0 cached\)")  # the whole conversation resent, picture too
        note = "(temperature 0 gives the same answer again under the same settings; /set temperature 0.7 for another)"
        said, _, retried = _shown(repl.child.before).partition("\n")  # greedy: said before the answer
        repl.prompt()
        assert said.strip() == note, said
        assert first and retried.startswith(first), (first, retried)  # the same greedy answer, now whole
        repl.run("And then?", r"server: prompt [\d,]+ tok \([\d,]+ cached\)")
        repl.run("/undo", r"removed turn 2: “And then\?”")
        repl.run("/context", r"turn 1: image photo\.png")
        repl.child.send("/exit\r")
        repl.child.expect(pexpect.EOF)
        repl.child.close()
        assert repl.child.exitstatus == 0
    finally:
        for server in servers:
            server.kill()
            server.wait()
