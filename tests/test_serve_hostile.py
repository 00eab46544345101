"""`internvl-chat serve` against requests built to hurt it: every refusal is one OpenAI-shaped
error that says what to do, costs little, and shows no control character the client sent."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from internvl_chat.chat.template import PromptBuilder
from serve_support import RunningServer

WAIT_S = 60


@pytest.fixture(scope="module")
def server(tiny_original):
    with RunningServer(tiny_original, queue_depth=8, slots=2) as running:
        yield running


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_a_conversation_past_the_context_is_refused_at_the_message_that_fills_it(server, monkeypatch):
    """Megabytes of empty turns were all tokenized before the refusal (a 27 MiB body kept a CPU
    busy for half a minute); now building stops at the first message past the context."""
    built = []
    original = PromptBuilder.next_turn

    def counting(self, *args, **kw):
        built.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(PromptBuilder, "next_turn", counting)
    turns = 5000
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * turns
    response = post(server, {"model": "tiny", "messages": [*messages, {"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "4,096-token context by message" in error["message"], error["message"]
    assert 0 < len(built) < turns // 2  # the turns past the context were never built
