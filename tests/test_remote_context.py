"""The server's context limit after the start: a server restarted at the same address with another
context (`serve --max-context 4096` after 8192) is noticed when it refuses a turn as too long,
when a request failed below HTTP (the connection broke or was refused: the server may have
restarted) or a proxy in front answered 502-504, or when the client itself would refuse an
attachment on the limit it knows; then the model list is read again. Otherwise no request is
added to a turn."""

from __future__ import annotations

import json

import pytest
from app_helpers import make_remote_app
from remote_helpers import FakeServer, Reply, fixture

from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.errors import ContextOverflowError, RemoteError
from internvl_chat.ui.app import ERROR, OK

GOOD = fixture("vllm/stream.sse")
# what `internvl-chat serve` answers for a conversation over its context (serve/conversation.py)
SERVE_400 = Reply.json({"error": {"message": "the conversation is 3,990 tokens and max_tokens is 300: together over this "
                                             "model's 4,096-token context; ask for at most 106",
                                  "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}},
                       400)  # fmt: skip
SAID = ("(the server said: the conversation is 3,990 tokens and max_tokens is 300: together over this model's "
        "4,096-token context; ask for at most 106)")  # its words in the refusal's line, without the error type


def models(context: int) -> bytes:
    card = json.loads(fixture("vllm/models.json"))
    card["data"][0]["max_model_len"] = context
    return json.dumps(card).encode()


def model_reads(server: FakeServer) -> int:
    return sum(r.path == "/v1/models" for r in server.requests)


def connected(server: FakeServer) -> RemoteConversation:
    conv = RemoteConversation.connect(server.url, params=SamplingParams(max_new_tokens=8))
    server.chat(Reply.sse(GOOD))
    list(conv.ask("first"))
    return conv


def test_a_turn_refused_as_too_long_reads_the_new_limit_and_says_it_in_one_line():
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        assert conv.max_context == 8192
        server.models = models(4096)  # restarted with --max-context 4096
        server.chat(SERVE_400)
        reads = model_reads(server)
        with pytest.raises(RemoteError) as err:
            list(conv.ask("second"))
        assert str(err.value) == (f"this turn and its answer do not fit the server's context, now 4,096 tokens {SAID}; "
                                  "a shorter message, /undo or /clear, or a smaller max_new_tokens")  # fmt: skip
        assert model_reads(server) == reads + 1
        assert conv.max_context == 4096 and [t.user_text for t in conv.turns] == ["first"]
        # the limit did not change this time: the line says the limit, not news
        server.chat(SERVE_400)
        with pytest.raises(RemoteError, match=r"^this turn and its answer do not fit the server's 4,096-token context \(the server said: "):
            list(conv.ask("second"))
        assert [t.user_text for t in conv.turns] == ["first"]


def test_after_a_broken_connection_the_next_turn_reads_the_limit_first():
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        reads = model_reads(server)
        server.chat(Reply.sse(GOOD))
        final = list(conv.ask("no break, no read"))[-1]
        assert model_reads(server) == reads and final["notice"] is None  # no request added to a turn
        server.chat(Reply.sse(b"", end="reset"))  # the server went away
        with pytest.raises(RemoteError, match="broke before the answer began"):
            list(conv.ask("second"))
        server.models = models(4096)  # and came back with a smaller context
        server.chat(Reply.sse(GOOD))
        final = list(conv.ask("third"))[-1]
        assert final["notice"] == "the server's context is now 4,096 tokens"
        assert conv.max_context == 4096
        assert [r.path for r in server.requests[-2:]] == ["/v1/models", "/v1/chat/completions"]
        assert [t.user_text for t in conv.turns] == ["first", "no break, no read", "third"]
        server.chat(Reply.sse(GOOD))
        reads = model_reads(server)
        assert list(conv.ask("fourth"))[-1]["notice"] is None and model_reads(server) == reads  # read once


def test_a_model_list_that_fails_after_a_break_changes_nothing():
    """A list that cannot be read (here: no longer scripted, a 404) leaves the limit; the chat goes on."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        server.chat(Reply.sse(b"", end="reset"))
        with pytest.raises(RemoteError):
            list(conv.ask("second"))
        server.models = None
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("third"))[-1]["notice"] is None
        assert conv.max_context == 8192 and [t.user_text for t in conv.turns] == ["first", "third"]


def test_a_model_list_whose_connection_breaks_after_a_break_is_the_turns_error():
    """The server is still unreachable: its one line, no chat request, and the list is read again next time."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        server.chat(Reply.sse(b"", end="reset"))
        with pytest.raises(RemoteError):
            list(conv.ask("second"))
        server.replies["/v1/models"].append(Reply(200, [b'{"data": ['], "application/json", end="reset"))
        chats = len(server.chat_bodies())
        with pytest.raises(RemoteError, match=r"^the connection to .* broke before the answer began"):
            list(conv.ask("third"))
        assert len(server.chat_bodies()) == chats and [t.user_text for t in conv.turns] == ["first"]
        server.models = models(4096)
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("fourth"))[-1]["notice"] == "the server's context is now 4,096 tokens"
        assert [t.user_text for t in conv.turns] == ["first", "fourth"]


BAD_GATEWAY = Reply(502, [b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"], "text/html")


def test_after_a_proxys_bad_gateway_the_next_turn_reads_the_limit_first():
    """A proxy in front answers 502-504 while the server behind it is down or starting: a restart,
    as a broken connection is. A server's own 500 is no restart: no request is added."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        server.chat(Reply.json({"error": {"message": "the engine failed"}}, 500))
        with pytest.raises(RemoteError, match=r"^the server answered 500 "):
            list(conv.ask("second"))
        server.chat(Reply.sse(GOOD))
        reads = model_reads(server)
        assert list(conv.ask("third"))[-1]["notice"] is None and model_reads(server) == reads
        for status in (502, 503, 504):
            server.chat(Reply(status, BAD_GATEWAY.pieces, "text/html"))
            with pytest.raises(RemoteError, match=rf" answered {status} "):
                list(conv.ask("while it restarts"))
            server.models = models(8192 - status)  # back, with another context
            server.chat(Reply.sse(GOOD))
            final = list(conv.ask("after"))[-1]
            assert final["notice"] == f"the server's context is now {8192 - status:,} tokens"
            assert [r.path for r in server.requests[-2:]] == ["/v1/models", "/v1/chat/completions"]
        assert [t.user_text for t in conv.turns] == ["first", "third", "after", "after", "after"]


def test_a_model_list_a_proxy_refuses_after_a_bad_gateway_is_the_turns_error():
    """Still down: the proxy's line, no chat request, and the list is read again next time."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        server.chat(BAD_GATEWAY)
        with pytest.raises(RemoteError):
            list(conv.ask("second"))
        server.replies["/v1/models"].append(BAD_GATEWAY)
        chats = len(server.chat_bodies())
        with pytest.raises(RemoteError, match=r" answered 502 Bad Gateway"):
            list(conv.ask("third"))
        assert len(server.chat_bodies()) == chats
        server.models = models(4096)
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("fourth"))[-1]["notice"] == "the server's context is now 4,096 tokens"


def test_what_the_known_limit_refuses_is_checked_against_the_servers_limit_read_again():
    """A server restarted with a larger context refuses nothing, so only the client's own refusal
    (an attachment over the limit) can learn it: it reads the list first, and only then."""
    with FakeServer(models(4096)) as server:
        conv = connected(server)
        reads = model_reads(server)
        conv.check_budget(1000)  # fits: nothing read
        assert model_reads(server) == reads
        with pytest.raises(ContextOverflowError, match=r"over the server's 4,096-token context; "):
            conv.check_budget(3000)  # the same limit read again: refused
        assert model_reads(server) == reads + 1
        server.models = models(8192)  # restarted with a larger context
        conv.check_budget(3000)
        assert conv.max_context == 8192 and model_reads(server) == reads + 2
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("second"))[-1]["notice"] == "the server's context is now 8,192 tokens"  # said once
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("third"))[-1]["notice"] is None


def test_a_server_that_cannot_be_reached_leaves_the_refusal_on_the_known_limit():
    with FakeServer(models(4096)) as server:
        conv = connected(server)
        server.replies["/v1/models"].append(Reply(200, [b'{"data": ['], "application/json", end="reset"))
        with pytest.raises(ContextOverflowError, match=r"over the server's 4,096-token context; "):
            conv.check_budget(3000)
        server.models = models(8192)  # the connection broke: the next turn reads the list again
        server.chat(Reply.sse(GOOD))
        assert list(conv.ask("second"))[-1]["notice"] == "the server's context is now 8,192 tokens"


def test_the_app_shows_a_refusal_as_one_short_line_and_the_new_limit(tmp_path):
    with FakeServer(models(8192)) as server:
        server.chat(Reply.sse(GOOD), SERVE_400, Reply.sse(b"", end="reset"), Reply.sse(GOOD))
        app, out = make_remote_app(server.url, tmp_path)
        assert app.handle_line("first") == OK
        server.models = models(4096)
        assert app.handle_line("second") == ERROR
        errors = [x for x in out.getvalue().splitlines() if x.startswith("error:")]
        assert errors == [f"error: this turn and its answer do not fit the server's context, now 4,096 tokens {SAID}; a "
                          "shorter message, /undo or /clear, or a smaller max_new_tokens"]  # fmt: skip
        assert app.session.max_context == 4096
        # a restart noticed after a broken connection: one line says so, the answer follows
        server.models = models(2048)
        assert app.handle_line("again") == ERROR
        assert app.handle_line("third") == OK
        assert "(the server's context is now 2,048 tokens)" in out.getvalue()
        assert [t.user_text for t in app.session.turns] == ["first", "third"]


def test_a_system_message_before_the_first_turn_is_counted_once_and_not_as_used():
    """As with a local model, the system message is only sent with the first message: before it the
    context holds nothing, and a first turn that fits with the system message counted once is let
    through (it was counted both as used and as part of the turn)."""
    with FakeServer(models(4096)) as server:
        conv = RemoteConversation.connect(server.url, params=SamplingParams(max_new_tokens=8),
                                          system_message="You are a helpful assistant. " * 20)
        assert conv.context_used == 0
        items = dict(conv.context_items([]))
        assert items["system message (sent with the first message)"] > 0
        assert not any(label.startswith("the server") for label in items)  # nothing held to differ from
        conv.check_budget(4096 - 8)  # the first turn and its answer fill the context exactly: it fits
        server.chat(Reply.sse(GOOD))
        list(conv.ask("first"))
        assert conv.context_used > 0


def test_a_system_message_changed_after_an_answer_is_measured_with_the_new_system_message():
    """The server counted the conversation under the system message it was sent with: after
    /system the resent conversation holds the new one instead, so the old count alone no longer stands
    for it (/context said the old count, and that the server counted fewer tokens than the estimates)."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        counted = conv.context_used
        assert conv.turns[-1].usage["prompt_tokens"] + conv.turns[-1].usage["completion_tokens"] == counted
        conv.set_system("You are a helpful assistant. " * 20)
        items = dict(conv.context_items([]))
        # the old count (this fixture's usage is 1,848 tokens) with the new system message in it
        assert conv.context_used == counted + items["system message"]
        assert sum(items.values()) - items["next message: template, plus your text"] - conv.params.max_new_tokens == conv.context_used
        conv.set_system(None)  # what the server counted is sent again
        assert conv.context_used == counted
        server.chat(Reply.sse(GOOD))
        conv.set_system("Be brief.")
        list(conv.ask("second"))
        usage = conv.turns[-1].usage
        assert conv.context_used == usage["prompt_tokens"] + usage["completion_tokens"]  # counted under it


def test_a_session_saved_with_an_empty_system_message_sends_none_and_keeps_the_servers_count(tmp_path):
    """A local session saved after `/system ''` holds "": to a server that is no system message, as
    None is (both send none), so /system '' after loading it does not drop the server's count."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        counted = conv.context_used
        data = conv.to_json()
        data["system_message"] = ""  # what a local session saves after `/system ''`
        (tmp_path / "talk.json").write_text(json.dumps(data))
        conv.set_system("Be brief.")
        conv.load(tmp_path / "talk.json")
        assert conv.system_message is None
        conv.set_system("")
        assert conv.context_used == counted


def test_a_shorter_system_message_does_not_forget_what_the_server_counted():
    """After /system the server's count still holds the conversation; only the system message in it
    changed. A turn it refused for want of room before a short /system is refused after it (the
    estimates alone, without what the server counts beyond them, let it through: 23 of 1,848)."""
    with FakeServer(models(1860)) as server:
        conv = connected(server)  # this fixture's usage is 1,848 tokens: no room for 10 + 8 more
        with pytest.raises(ContextOverflowError):
            conv.check_attach([])
        conv.set_system("Hi.")
        system = dict(conv.context_items([]))["system message"]
        assert conv.context_used == 1848 + system
        with pytest.raises(ContextOverflowError):
            conv.check_attach([])


def test_the_attach_line_names_the_tiles_llama_cpp_makes_of_a_picture(tmp_path):
    """The line said `→ 7 tiles · ≈771 tokens` for a 640×400 picture on llama.cpp: InternVL's tiles,
    the server's tokens (llama.cpp makes 3 tiles of it)."""
    from PIL import Image

    Image.new("RGB", (640, 400), "red").save(tmp_path / "scene.png")
    llamacpp = json.loads(fixture("llamacpp/models.json"))
    with FakeServer(json.dumps(llamacpp).encode()) as server:
        app, out = make_remote_app(server.url, tmp_path)
        assert app.handle_line(f"/image {tmp_path / 'scene.png'}") == OK
        assert "+ image scene.png 640×400 → 3 tiles · ≈771 tokens" in out.getvalue()
    with FakeServer(models(8192)) as server:  # a server that tiles as InternVL does
        app, out = make_remote_app(server.url, tmp_path)
        assert app.handle_line(f"/image {tmp_path / 'scene.png'}") == OK
        assert "+ image scene.png 640×400 → 7 tiles · ≈1,795 tokens" in out.getvalue()


def test_a_full_conversation_is_advised_undo_or_clear_as_the_local_one_is():
    """At the context's edge no fewer tiles and no shorter message fit: the local model's refusal
    names /undo or /clear (and a smaller answer only where it alone fits); the server's said "use
    fewer tiles or frames, /clear, or a smaller max_new_tokens" for a text-only conversation, which
    none of them could help, and left out /undo."""
    with FakeServer(models(4096)) as server:
        conv = connected(server)
        smallest = conv.turn_tokens([]) + 1  # a message's one token at least
        conv.turns[-1].usage = {"prompt_tokens": 4096 - smallest - 8, "completion_tokens": 1}  # room for 7 answer tokens
        with pytest.raises(ContextOverflowError) as refused:
            conv.check_attach([])
        assert str(refused.value).endswith("; /undo or /clear, or a smaller max_new_tokens"), str(refused.value)
        conv.turns[-1].usage = {"prompt_tokens": 4096 - smallest, "completion_tokens": 1}  # no answer fits
        with pytest.raises(ContextOverflowError) as refused:
            conv.check_attach([])
        assert str(refused.value).endswith("; /undo or /clear"), str(refused.value)


def test_a_retry_the_server_refuses_as_too_long_names_the_fixes_of_a_retry():
    """A retry asks the same question with the same attachments: "a shorter message" cannot help
    it (the local model's refusal of a retry names a smaller answer, or /undo and asking it
    shorter); the server's refusal of a retry said "a shorter message, /undo or /clear, …" all the same."""
    with FakeServer(models(8192)) as server:
        conv = connected(server)
        server.models = models(4096)
        server.chat(SERVE_400)
        with pytest.raises(RemoteError) as err:
            list(conv.retry())
        assert str(err.value).endswith(f"{SAID}; a smaller max_new_tokens, or /undo and ask it shorter"), str(err.value)
        assert [t.user_text for t in conv.turns] == ["first"]
