"""The server's context limit after the start: a server restarted at the same address with another
context (`serve --max-context 4096` after 8192) is noticed when it refuses a turn as too long; then
the model list is read again."""

from __future__ import annotations

import json

import pytest
from remote_helpers import FakeServer, Reply, fixture

from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.errors import RemoteError

GOOD = fixture("vllm/stream.sse")
# what `internvl-chat serve` answers for a conversation over its context (serve/conversation.py)
SERVE_400 = Reply.json({"error": {"message": "the conversation is 3,990 tokens and max_tokens is 300: together over this "
                                             "model's 4,096-token context; ask for at most 106",
                                  "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}},
                       400)  # fmt: skip


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
        assert str(err.value) == ("this turn and its answer do not fit the server's context, now 4,096 tokens; use "
                                  "fewer tiles or frames, /undo or /clear, or a smaller max_new_tokens")  # fmt: skip
        assert model_reads(server) == reads + 1
        assert conv.max_context == 4096 and [t.user_text for t in conv.turns] == ["first"]
        # the limit did not change this time: the line says the limit, not news
        server.chat(SERVE_400)
        with pytest.raises(RemoteError, match=r"^this turn and its answer do not fit the server's 4,096-token context; "):
            list(conv.ask("second"))
        assert [t.user_text for t in conv.turns] == ["first"]
