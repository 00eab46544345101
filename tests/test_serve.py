"""`internvl-chat serve` through the official `openai` client and raw HTTP on 127.0.0.1.

One server (tiny checkpoint, CPU, float32) serves the module; tests that need another setting
change the shared options inside try/finally. Engine hooks (called in the engine thread) hold a
job or observe its events, so queueing and cancellation are tested by events, never by timing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from internvl_chat.serve import engine as engine_module
from internvl_chat.serve.protocol import MAX_STOP_STRING_CHARS
from fault_helpers import fail_once
from media_helpers import textured_rgb
from serve_support import RunningServer, chat_body, crowd, png_bytes, wait_until

WAIT_S = 60


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve_media") / "photo.png"
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(path)  # 2×1 grid + thumbnail: 3 tiles
    return path


def ask(client, text="Describe the scene.", **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


# ---- endpoints ---------------------------------------------------------------------------------


def test_health_and_models_list(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    entry = models[0].model_dump()
    assert entry["owned_by"] == "internvl-chat"
    assert entry["context_length"] == entry["max_model_len"] == 4096


def test_non_streaming_answer_usage_and_timings(client, builder):
    out = ask(client, "What is in the picture?", max_tokens=6)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt_len = len(builder.first_turn("What is in the picture?"))
    assert out.usage.prompt_tokens == prompt_len
    assert 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == prompt_len + out.usage.completion_tokens
    timings = out.model_extra["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == prompt_len
    assert timings["cache_n"] == out.usage.prompt_tokens_details.cached_tokens
    assert {"prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"} <= set(timings)


def test_streaming_gives_the_same_text_and_a_final_usage_chunk(client):
    whole = ask(client, "Tell me about colours.", max_tokens=10)
    stream = ask(client, "Tell me about colours.", max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_is_exactly_openais(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length") and payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["prompt_tokens"] > 0


def test_stop_strings_cut_the_answer_and_end_it_with_stop(client):
    full = ask(client, "Count to ten.", max_tokens=24).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[: full.index(stop)]
    out = ask(client, "Count to ten.", max_tokens=24, stop=[stop, "never appears \u2603"])
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected, "stop")
    chunks = list(ask(client, "Count to ten.", max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_an_answer_a_stop_string_ends_counts_the_tokens_up_to_the_one_that_completes_it(client):
    """As vLLM counts them: the token after the stop string was sampled too, and counted in usage."""
    answers = [ask(client, "Count to ten.", max_tokens=k).choices[0] for k in range(1, 9)]
    texts = [""] + [a.message.content for a in answers]
    # a stop string first seen in the answer's k-th token: the last character that token adds, said nowhere
    # before it (not U+FFFD: part of a character is known to be no character only at a later token)
    cases = [(k, texts[k][-1]) for k in range(1, len(texts))
             if answers[k - 1].finish_reason == "length" and len(texts[k]) > len(texts[k - 1])
             and texts[k].startswith(texts[k - 1]) and texts[k][-1] not in texts[k][:-1] + "\ufffd"]  # fmt: skip
    assert cases, texts
    for k, stop in cases:
        out = ask(client, "Count to ten.", max_tokens=24, stop=stop)
        assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", k), stop
        chunks = list(ask(client, "Count to ten.", max_tokens=24, stop=stop, stream=True,
                          stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[-1].usage.completion_tokens == k, stop


@contextlib.contextmanager
def _every_slot_streaming_by(server, interval: int):
    """Every slot's session sends an event per `interval` tokens inside the block, one per token after it."""
    sessions = [slot.session for slot in server.worker.slots.slots]
    try:
        for session in sessions:
            session.stream_interval = interval
        yield
    finally:
        for session in sessions:
            session.stream_interval = 1


@pytest.mark.parametrize("interval", [1, 4])
def test_the_token_ids_of_an_answer_a_stop_string_ends_are_those_usage_counts(server, client, interval):
    """vLLM's `return_token_ids`: every token up to the one that completes the stop string, whether or
    not some of them spell the text that is sent, however many tokens an event holds."""
    extra = {"return_token_ids": True}
    full = ask(client, "Tell me about colours.", max_tokens=10, extra_body=extra).choices[0].model_extra["token_ids"]
    texts = [server.loaded.tokenizer.decode(full[:k]) for k in range(len(full) + 1)]
    # a stop string that is all the k-th token adds, said nowhere before it: the text sent is the first k - 1 tokens'
    cases = [(k, texts[k][len(texts[k - 1]):]) for k in range(2, len(texts)) if texts[k].startswith(texts[k - 1])
             and texts[k].find(texts[k][len(texts[k - 1]):]) == len(texts[k - 1]) > 0
             and "\ufffd" not in texts[k] and len(texts[k]) > len(texts[k - 1])]  # fmt: skip
    assert cases, texts
    with _every_slot_streaming_by(server, interval):
        for k, stop in cases:
            out = ask(client, "Tell me about colours.", max_tokens=24, stop=stop, extra_body=extra)
            choice = out.choices[0]
            assert (choice.message.content, choice.finish_reason) == (texts[k - 1], "stop"), stop
            assert choice.model_extra["token_ids"] == full[:k] and out.usage.completion_tokens == k, stop
            chunks = list(ask(client, "Tell me about colours.", max_tokens=24, stop=stop, stream=True, extra_body=extra,
                              stream_options={"include_usage": True}))  # fmt: skip
            assert chunks[-2].choices[0].model_extra["token_ids"] == full[:k] and chunks[-1].usage.completion_tokens == k


def test_with_several_tokens_an_event_a_stop_string_still_counts_the_tokens_up_to_its_end(server, client):
    """[generation] stream_interval 4: the tokens after the stop string in its event were counted too."""
    answers = [ask(client, "Count to ten.", max_tokens=k).choices[0] for k in range(1, 9)]
    texts = [""] + [a.message.content for a in answers]
    cases = [(k, texts[k][-1]) for k in range(1, len(texts))
             if answers[k - 1].finish_reason == "length" and len(texts[k]) > len(texts[k - 1])
             and texts[k].startswith(texts[k - 1]) and texts[k][-1] not in texts[k][:-1] + "\ufffd"]  # fmt: skip
    assert any(k % 4 for k, _ in cases), texts  # a stop string ended before its event's last token
    with _every_slot_streaming_by(server, 4):
        for k, stop in cases:
            out = ask(client, "Count to ten.", max_tokens=24, stop=stop)
            assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", k), stop
            assert out.choices[0].message.content == texts[k][:-1]
            chunks = list(ask(client, "Count to ten.", max_tokens=24, stop=stop, stream=True,
                              stream_options={"include_usage": True}))  # fmt: skip
            assert chunks[-1].usage.completion_tokens == k, stop


def _answer_by_tokens(server, client, max_tokens: int) -> tuple[list[int], list[str], list[str]]:
    """A greedy answer's token ids, its text after each number of tokens, and the text each token adds
    ("" where a token completes no character)."""
    out = ask(client, "Tell me about colours.", max_tokens=max_tokens, extra_body={"return_token_ids": True})
    full = out.choices[0].model_extra["token_ids"]
    texts = [server.loaded.tokenizer.decode(full[:k]) for k in range(len(full) + 1)]
    added = [texts[k][len(texts[k - 1]):] if texts[k].startswith(texts[k - 1]) else "" for k in range(1, len(texts))]
    return full, texts, added


@pytest.mark.parametrize("interval", [1, 4])
def test_of_two_stop_strings_beginning_together_usage_counts_to_the_shorter_ones_end(server, client, interval):
    """Stop strings [the k-th and next token's text, the k-th token's text]: both begin where the text is
    cut; the shorter is complete at token k. With both in one event (stream_interval 4), usage counted
    the tokens up to the longer one's end (the list's first), one more than an event per token."""
    extra = {"return_token_ids": True}
    full, texts, added = _answer_by_tokens(server, client, 10)
    # token k adds text said nowhere before it, and token k + 1 adds more (no U+FFFD: whole characters)
    cases = [(k, added[k - 1] + added[k], added[k - 1]) for k in range(1, len(added))
             if added[k - 1] and added[k] and texts[k + 1].find(added[k - 1]) == len(texts[k - 1])
             and "\ufffd" not in texts[k + 1]]  # fmt: skip
    assert any(k % interval for k, _, _ in cases) or interval == 1, texts  # both in one event
    with _every_slot_streaming_by(server, interval):
        for k, longer, shorter in cases:
            out = ask(client, "Tell me about colours.", max_tokens=24, stop=[longer, shorter], extra_body=extra)
            choice = out.choices[0]
            assert (choice.message.content, choice.finish_reason) == (texts[k - 1], "stop"), (longer, shorter)
            assert (out.usage.completion_tokens, choice.model_extra["token_ids"]) == (k, full[:k]), (longer, shorter)


@pytest.mark.parametrize("interval", [1, 4])
def test_the_stop_string_completed_first_cuts_the_answer_whatever_the_stream_interval(server, client, interval):
    """Stop strings [tokens j to j+2's text, token j+1's text]: the longer begins first, the shorter is
    complete first. With both in one event (stream_interval 4) the longer cut the answer one token
    earlier than with an event per token: a display setting changed the answer's text."""
    extra = {"return_token_ids": True}
    full, texts, added = _answer_by_tokens(server, client, 12)
    cases = [(j, added[j] + added[j + 1] + added[j + 2], added[j + 1]) for j in range(len(added) - 2)
             if added[j] and added[j + 1] and added[j + 2] and "\ufffd" not in texts[j + 3]
             and texts[j + 3].find(added[j] + added[j + 1] + added[j + 2]) == len(texts[j])
             and texts[j + 3].find(added[j + 1]) == len(texts[j + 1])]  # fmt: skip
    assert any((j + 2) % 4 for j, _, _ in cases), texts  # both complete within one event of 4 tokens
    with _every_slot_streaming_by(server, interval):
        for j, longer, shorter in cases:
            out = ask(client, "Tell me about colours.", max_tokens=24, stop=[longer, shorter], extra_body=extra)
            choice = out.choices[0]
            assert (choice.message.content, choice.finish_reason) == (texts[j + 1], "stop"), (longer, shorter)
            assert (out.usage.completion_tokens, choice.model_extra["token_ids"]) == (j + 2, full[: j + 2])


def test_a_stop_string_over_the_length_limit_is_400_naming_stop(client):
    """The number of stop strings was capped, their length only by the body size (megabytes)."""
    at_limit = "\u2603" * MAX_STOP_STRING_CHARS  # characters, not bytes (3 each in UTF-8)
    assert ask(client, max_tokens=2, stop=["never", at_limit]).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=2, stop=["never", at_limit + "x"])
    assert err.value.body["param"] == "stop" and err.value.body["type"] == "invalid_request_error"
    limit = f"{MAX_STOP_STRING_CHARS} characters"
    assert limit in err.value.body["message"] and f"one has {MAX_STOP_STRING_CHARS + 1}" in err.value.body["message"]


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages.1.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
         "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
         "messages.0.content.0"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),  # was named max_tokens, which it had not sent
        ({"extra_body": {"media_io_kwargs": {"video": "8 frames"}}}, "media_io_kwargs.video"),
        ({"extra_body": {"media_io_kwargs": {"video": 8}}}, "media_io_kwargs.video"),
        # a list (or 0, false, "") was read as no options at all
        ({"extra_body": {"media_io_kwargs": {"video": []}}}, "media_io_kwargs.video"),
        ({"extra_body": {"media_io_kwargs": {"video": 0}}}, "media_io_kwargs.video"),
        # the param named media_io_kwargs.video.num_frames, which the client had not sent
        ({"extra_body": {"mm_processor_kwargs": {"num_frames": "8"}}}, "mm_processor_kwargs.num_frames"),
        ({"extra_body": {"mm_processor_kwargs": {"num_frames": 0}}}, "mm_processor_kwargs.num_frames"),
        ({"extra_body": {"media_io_kwargs": {"video": {"num_frames": 0}}, "mm_processor_kwargs": {"num_frames": 4}}},
         "media_io_kwargs.video.num_frames"),
        # options other servers read, dropped: a video sampled at 8 frames when 2 per second were asked
        ({"extra_body": {"media_io_kwargs": {"video": {"fps": 2}}}}, "media_io_kwargs.video.fps"),
        ({"extra_body": {"media_io_kwargs": {"image": {"mode": "RGB"}}}}, "media_io_kwargs.image"),
        ({"extra_body": {"mm_processor_kwargs": {"min_dynamic_patch": 2}}}, "mm_processor_kwargs.min_dynamic_patch"),
        # controls this server does not have were silently ignored
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"42": 0, "43": -100}}, "logit_bias"),
        ({"logit_bias": {"42": False}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"extra_body": {"function_call": {"name": "f"}}}, "function_call"),
        ({"extra_body": {"stop_token_ids": [7]}}, "stop_token_ids"),
        ({"extra_body": {"ignore_eos": True}}, "ignore_eos"),
        # asked for what a text-only server without tools cannot give, and were answered as if not asked
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "b"}]}, "messages.1.tool_calls"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_with_the_param(client, change, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]


@pytest.mark.parametrize(
    "change, fix",
    [
        ({"n": 17}, "more requests for more answers"),
        ({"n": 2, "extra_body": {"best_of": 3}}, "send best_of equal to n (2)"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "leave them out"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "leave them out"),
    ],
)  # fmt: skip
def test_refusals_of_controls_it_does_not_have_say_what_to_do(client, change, fix):
    # these said only what is not supported
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, **change)
    assert fix in err.value.body["message"]


def test_neutral_values_of_controls_it_does_not_have_are_accepted(client):
    extra = {"stop_token_ids": [], "ignore_eos": False, "function_call": "none"}
    answer = ask(client, top_logprobs=0, tool_choice="auto", functions=[], logit_bias={"42": 0}, extra_body=extra)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # and what does not change an answer: bookkeeping, a latency hint, the neutral levels
    answer = ask(client, modalities=["text"], reasoning_effort="none", verbosity="medium", metadata={"k": "v"},
                 store=False, user="u1", parallel_tool_calls=False, prediction={"type": "content", "content": "x"})
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_top_p_zero_keeps_the_most_likely_token(client):
    # OpenAI accepts top_p 0 (clients send it with temperature for determinism); it was a 400
    greedy = ask(client, "Tell me a story.", max_tokens=12, temperature=0).choices[0].message.content
    for seed in (1, 2):
        sampled = ask(client, "Tell me a story.", max_tokens=12, temperature=1.5, top_p=0, seed=seed)
        assert sampled.choices[0].message.content == greedy


def test_switches_sent_as_null_are_off(server):
    # a client that passes every argument sends stream=None; that was a 400 ("Input should be a valid boolean")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": None,
            "stream_options": {"include_usage": None}, "return_token_ids": None}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and "token_ids" not in answer["choices"][0]


@pytest.mark.parametrize("path, prompt", [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                          ("/v1/completions", {"prompt": "Hi"})])  # fmt: skip
def test_stream_options_without_a_stream_are_refused_but_null_ones_are_not(server, path, prompt):
    # include_usage with stream false was accepted, and the answer had no usage chunk to give it: vLLM answers 400
    def post(**fields) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", json={"model": "tiny", **prompt, "max_tokens": 1, **fields}, timeout=WAIT_S)

    refused = post(stream=False, stream_options={"include_usage": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options", refused.text
    assert refused.json()["error"]["message"].startswith("stream_options.include_usage is set but stream is not true")
    for fields in ({"stream": None, "stream_options": {"include_usage": None}}, {"stream": False, "stream_options": {}}):
        assert post(**fields).status_code == 200, fields


def test_media_options_sent_as_null_are_the_server_s_defaults(server, photo):
    # max_dynamic_patch null took the checkpoint's 12 tiles over the server's [media] max_tiles; num_frames null was a 400
    from internvl_chat.serve.protocol import parse_request

    url = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            "mm_processor_kwargs": {"max_dynamic_patch": None, "num_frames": None},
            "media_io_kwargs": {"video": {"num_frames": None}}}  # fmt: skip
    before = server.options.max_tiles
    server.options.max_tiles = 1
    try:
        prompt = server.worker.prompts.make(parse_request(json.dumps(body).encode()))
    finally:
        server.options.max_tiles = before
    assert [(m.max_tiles, m.tiles) for m in prompt.media] == [(1, 1)]  # one tile: the server's default, no thumbnail


def test_an_assistant_s_refusal_is_what_it_said(client):
    # OpenAI returns a refusal with content null; resent, it was dropped (an empty answer in the prompt)
    said = "I cannot help with that request."

    def prompt_tokens(assistant: dict) -> int:
        messages = [{"role": "user", "content": "a"}, {"role": "assistant", **assistant}, {"role": "user", "content": "b"}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage.prompt_tokens

    as_text = prompt_tokens({"content": said})
    assert prompt_tokens({"content": None, "refusal": said}) == as_text
    assert prompt_tokens({"content": [{"type": "refusal", "refusal": said}]}) == as_text
    assert as_text > prompt_tokens({"content": None})
    for user in ({"refusal": said}, {"content": [{"type": "refusal", "refusal": said}]}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "", **user}], max_tokens=1)
        assert "only an assistant message holds a refusal" in err.value.body["message"]


@pytest.mark.parametrize(
    "roles, said, param",
    [
        (["user", "assistant"], "message 1, the last, is the assistant's", "messages.1.role"),
        (["system", "user", "assistant", "assistant"], "message 3, the last, is the assistant's", "messages.3.role"),
        (["system", "developer"], "the conversation has no user message", "messages"),
        (["assistant", "system"], "the conversation has no user message", "messages"),
    ],
)  # fmt: skip
def test_a_conversation_this_server_cannot_answer_is_told_how_to_mend_it(client, roles, said, param):
    # any other order is rendered as the chat template renders it (test_serve_order.py)
    messages = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert said in err.value.body["message"] and err.value.body["param"] == param


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_a_json_response_format_is_refused_with_what_to_do(client, kind):
    # it said "only the text response_format is supported" and no more
    body = {"type": kind, **({"json_schema": {"name": "x", "schema": {"type": "object"}}} if kind == "json_schema" else {})}
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, response_format=body)
    assert err.value.body["param"] == "response_format"
    assert "ask for JSON in the message" in err.value.body["message"]
    assert ask(client, response_format={"type": "text"}).choices[0].message.content is not None


def test_a_tool_message_is_told_there_is_no_function_calling(client):
    messages = [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert err.value.body["param"] == "messages.1.role"
    assert "'tool' messages are not supported" in err.value.body["message"]
    assert "as text in a user message" in err.value.body["message"]


def test_wrong_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["code"] == "model_not_found"


def test_unknown_endpoint_and_invalid_json_are_openai_shaped(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_oversized_body_is_413(server, client):
    server.options.max_body_bytes = 1000
    try:
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, "x" * 2000)
        assert err.value.status_code == 413
    finally:
        server.options.max_body_bytes = 64 << 20


def test_api_key_is_required_when_set(server, client):
    server.options.api_key = "s3cret"
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(client)
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="s3cret-not").models.list()
        assert ask(server.client(api_key="s3cret")).choices[0].message.content is not None
        assert httpx.get(f"{server.url}/health").status_code == 200  # health checks need no key
    finally:
        server.options.api_key = ""


# ---- queueing and cancellation ---------------------------------------------------------------------


def _read_stream_on_a_thread(client, body: dict, finishes: dict, name: str) -> threading.Thread:
    """Stream `body` on a thread of its own, its choices' finish reasons kept in finishes[name]: a
    stream's headers come only once the engine starts its job, so opening it waits while the engine
    is held or the job is queued."""

    def read() -> None:
        stream = client.chat.completions.create(**body, stream=True)
        finishes[name] = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def test_full_queue_is_429_with_retry_after(server, client):
    worker = server.worker
    started, release = threading.Event(), threading.Event()
    finishes: dict[str, list] = {}

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    worker.on_start, server.options.queue_depth = hold, 1
    readers = []
    try:
        readers.append(_read_stream_on_a_thread(client, chat_body("one", max_tokens=4), finishes, "first"))
        assert started.wait(WAIT_S)  # running (held), so the queue is empty
        readers.append(_read_stream_on_a_thread(client, chat_body("two", max_tokens=4), finishes, "second"))
        wait_until(lambda: worker.waiting == 1, "the second stream waits in the queue")
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**chat_body("three", max_tokens=4))
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.body["code"] == "queue_full"
        release.set()
        for reader in readers:
            reader.join(WAIT_S)
    finally:
        release.set()
        worker.on_start, server.options.queue_depth = None, 8
    assert set(finishes) == {"first", "second"} and all(finishes.values())  # neither was lost


def test_clients_refused_together_are_told_to_come_back_one_after_another(server, client):
    """Clients refused together were told the same moment in whole seconds: openai-python waits
    exactly the Retry-After, so they all came back at once, filled the queue again and were refused
    again while the engine had sat idle (30 concurrent openai clients with their default 2 retries on
    a queue of 8 and 50 ms jobs: 3 failed). Each refused client is now told its own moment, a mean
    job after the one refused before it, also in milliseconds (`retry-after-ms`, which openai-python
    prefers). The engine's clock is the test's, stopped: jobs of 0.25 s, one held at its start."""
    worker, started, release = server.worker, threading.Event(), threading.Event()
    finishes: dict[str, list] = {}

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    assert worker.wait_idle(WAIT_S)  # the earlier tests' jobs have appended their durations
    worker.clock = lambda: 100.0
    worker._durations.clear()
    worker._durations.extend([0.25] * 4)
    worker._told.clear()
    worker.on_start, server.options.queue_depth = hold, 0
    told = []
    try:
        reader = _read_stream_on_a_thread(client, chat_body("one", max_tokens=4), finishes, "first")
        assert started.wait(WAIT_S)
        for n in range(3):
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(**chat_body(f"refused {n}", max_tokens=4))
            told.append((err.value.response.headers.get("retry-after-ms"), err.value.response.headers["retry-after"]))
        release.set()
        reader.join(WAIT_S)
    finally:
        release.set()
        worker.wait_idle(WAIT_S)
        worker.on_start, server.options.queue_depth = None, 8
        worker.clock = time.perf_counter
        worker._told.clear()
    # the running job's 0.25 s, then 0.25 s more for each client told before
    assert told == [("250", "1"), ("500", "1"), ("750", "1")]
    assert finishes["first"]


def test_retry_after_counts_what_the_running_job_has_left(server, client):
    """A 429's Retry-After counted the running job as a whole mean job however long it had run:
    a client was told to wait a whole job for one about to end. Now what it has left is estimated
    from the recent jobs that ran longer; a job longer than all of them counts as a mean one. The
    engine's clock is the test's: jobs of 10 s each, then one held at chosen points of its run."""
    worker, now = server.worker, [0.0]
    started, release = threading.Event(), threading.Event()
    finishes: dict[str, list] = {}

    def ten_seconds(job):
        now[0] += 10.0

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    def retry_after() -> int:
        worker._told.clear()  # each as the first client refused: those still to come back lengthen the wait
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**chat_body("three", max_tokens=4))
        return int(err.value.response.headers["retry-after"])

    # the engine appends a job's duration after its client has had the whole answer: the earlier
    # test's last job may still be ending; its duration (real clock, or the fake one minus a real
    # start) landing after the clear below skewed the mean (Retry-After 1, not 11, on a busy machine)
    assert worker.wait_idle(WAIT_S)
    worker.clock = lambda: now[0]
    getattr(worker, "_durations", []).clear()  # the module's earlier jobs, timed by the real clock
    readers = []
    try:
        worker.on_start = ten_seconds
        for _ in range(3):
            client.chat.completions.create(**chat_body("one", max_tokens=2))
        worker.on_start, server.options.queue_depth = hold, 1
        readers.append(_read_stream_on_a_thread(client, chat_body("one", max_tokens=4), finishes, "first"))
        assert started.wait(WAIT_S)
        readers.append(_read_stream_on_a_thread(client, chat_body("two", max_tokens=4), finishes, "second"))
        wait_until(lambda: worker.waiting == 1, "the second stream waits in the queue")
        start = now[0]
        now[0] = start + 9.5  # about to end: 0.5 s left, then a 10 s job for the one waiting
        assert retry_after() == 11
        now[0] = start + 2.0
        assert retry_after() == 18
        now[0] = start + 30.0  # longer than any: nothing says how much longer, a mean job
        assert retry_after() == 20
        release.set()
        for reader in readers:
            reader.join(WAIT_S)
    finally:
        release.set()
        worker.wait_idle(WAIT_S)  # "second" timed by the fake clock, not a real end minus a fake start
        worker.on_start, server.options.queue_depth = None, 8
        worker.clock = time.perf_counter
    assert set(finishes) == {"first", "second"} and all(finishes.values())


def test_queue_depth_zero_still_serves_an_idle_engine(server, client):
    worker = server.worker
    started, release = threading.Event(), threading.Event()
    finishes: dict[str, list] = {}

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    server.options.queue_depth = 0
    reader = None
    try:
        assert server.worker.wait_idle(WAIT_S)
        assert ask(client).choices[0].finish_reason in ("stop", "length")
        # that job's client has its answer before the engine marks it done: a stream submitted in
        # between found the engine busy and, with depth 0, was refused (then `started` never came)
        assert worker.wait_idle(WAIT_S)
        worker.on_start = hold
        reader = _read_stream_on_a_thread(client, chat_body("one", max_tokens=4), finishes, "first")
        assert started.wait(WAIT_S)
        with pytest.raises(openai.RateLimitError) as err:  # busy, and nothing may wait: said so, not "0 waiting"
            client.chat.completions.create(**chat_body("two", max_tokens=4))
        assert err.value.body["message"].startswith("the model is busy and its queue is full (none may wait")
        release.set()
        reader.join(WAIT_S)
    finally:
        release.set()
        worker.on_start, server.options.queue_depth = None, 8
    assert finishes["first"]


def test_client_disconnect_stops_generation(server, client):
    worker = server.worker
    first_event, held = threading.Event(), {}

    def watch(job, event):
        if not first_event.is_set():
            held["job"], held["first_final"] = job, event["finish_reason"] is not None
            first_event.set()
            assert job.cancel.wait(WAIT_S)  # the engine waits here until the server sees the client leave

    worker.on_event = watch
    try:
        stream = client.chat.completions.create(**chat_body("Write a long story.", max_tokens=400), stream=True)
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        assert first_event.wait(WAIT_S) and not held["first_final"]
        stream.close()  # the client goes away mid-answer
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    record = next(r for r in worker.finished if r["job"] == held["job"].number)
    assert record["finish_reason"] == "cancelled"
    assert record["completion_tokens"] < 400


def test_a_client_that_leaves_during_its_upload_is_no_server_error(server):
    # ASGI messages as uvicorn delivers them when a client sends half a body and closes the connection
    messages = [{"type": "http.request", "body": b'{"model": "tiny", "messa', "more_body": True}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"4000")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", server.port)}  # fmt: skip
    asyncio.run(server.app(scope, receive, send))  # an exception out of the app is a 500 and a traceback in the log
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert httpx.get(f"{server.url}/health", timeout=WAIT_S).status_code == 200


def test_concurrent_clients_are_answered_or_refused_never_lost(server):
    outcomes: list[int] = []
    lock = threading.Lock()

    def client_thread(n: int) -> None:
        with httpx.Client(timeout=WAIT_S) as http:
            for k in range(2):
                body = chat_body(f"client {n} request {k}", max_tokens=4)
                r = http.post(f"{server.url}/v1/chat/completions", json=body)
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
                with lock:
                    outcomes.append(r.status_code)

    crowd(server, client_thread, count=8, queue_depth=2, join_s=WAIT_S * 4)
    assert len(outcomes) == 16 and 200 in outcomes
    assert server.worker.wait_idle(WAIT_S) and server.worker.waiting == 0


def _truncated_picture_body(photo: Path, **kw) -> dict:
    """A chat request whose PNG has a sound header (the request is accepted and queued) but pixel
    data cut off: only the engine, decoding it, finds it broken."""
    url = "data:image/png;base64," + base64.b64encode(photo.read_bytes()[:4000]).decode()
    body = chat_body("What is this?", max_tokens=4, **kw)
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": url}}]
    return body


def test_a_picture_the_engine_cannot_decode_is_a_400_streamed_or_not(server, photo):
    """The stream's status line waits for the engine to have decoded the pictures: it was a 200, a
    role chunk and an error event, where the same request without `stream` (and vLLM's, OpenAI's
    either way) is a 400."""
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=_truncated_picture_body(photo), timeout=WAIT_S)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_truncated_picture_body(photo, stream=True),
                      timeout=WAIT_S) as r:  # fmt: skip
        status, kind, streamed = r.status_code, r.headers["content-type"], r.read()
    assert plain.status_code == status == 400 and kind.startswith("application/json"), (status, kind)
    error = plain.json()["error"]
    assert "truncated" in error["message"] and error["param"] == "messages.0.content.0"
    assert json.loads(streamed) == plain.json()
    assert server.worker.alive and server.worker.wait_idle(WAIT_S)


def test_a_good_stream_opens_with_the_role_then_tokens_then_done(server):
    body = chat_body("Describe a harbour.", max_tokens=6, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])  # tokens came
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_stream_whose_engine_never_says_started_still_streams(server, monkeypatch):
    """The handler waits for "started" before its status line; an engine path that sends its text
    without it (none does today) must not leave the client waiting for ever."""
    monkeypatch.setattr(engine_module.Job, "begin", lambda job: None)
    body = chat_body("Describe a harbour.", max_tokens=6, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_an_error_after_the_stream_began_is_an_sse_error_event_then_done(server, client, monkeypatch):
    """Once the engine has started a job (its headers are out), a failure is the stream's last
    event, then [DONE]: here running out of memory at the second decode step."""
    fail_once(monkeypatch, server.worker.model, "forward", _cuda_out_of_memory, 3)
    body = chat_body("Write a long story.", max_tokens=20, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200
        events = r.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["code"] == "generation_failed" and error["message"].startswith("out of memory")
    monkeypatch.undo()
    fail_once(monkeypatch, server.worker.model, "forward", _cuda_out_of_memory, 3)
    with pytest.raises(openai.APIError, match="out of memory"):  # the openai client raises it mid-stream
        list(client.chat.completions.create(**body))


def test_a_stopped_engine_is_503(tiny_original):
    with RunningServer(tiny_original, max_context=256) as down:
        down.worker.stop()
        with pytest.raises(openai.InternalServerError) as err:
            ask(down.client())
        assert err.value.status_code == 503
        assert httpx.get(f"{down.url}/health").status_code == 503


def test_running_out_of_memory_in_the_vision_encoder_is_the_one_line_error_and_the_next_request_is_served(
    server, client, monkeypatch
):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(448, 448, seed=21))).decode()
    body = chat_body("What is this?", max_tokens=4)
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": url}}]
    encode = server.worker.model.encode_images
    calls = []

    def out_of_memory_once(pixels, cancel=None):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise MemoryError
        return encode(pixels, cancel)

    monkeypatch.setattr(server.worker.model, "encode_images", out_of_memory_once)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**body)
    error = err.value.body
    assert error["code"] == "generation_failed" and error["message"].startswith("out of memory in the vision encoder")
    assert server.worker.alive
    assert client.chat.completions.create(**body).choices[0].finish_reason in ("stop", "length")
    assert len(calls) == 2  # the failed features were not cached: the picture is encoded again




def _cuda_out_of_memory() -> RuntimeError:
    # what torch raises when a CUDA allocation outside its caching allocator fails (torch >= 2.8)
    return getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: out of memory")


def _cpu_out_of_memory() -> RuntimeError:
    return RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8")


@pytest.mark.parametrize("where", ["decode", "pixels"])
def test_running_out_of_memory_anywhere_in_a_request_is_the_one_line_error_and_the_slot_answers_the_same(
    server, client, monkeypatch, where
):
    # a CUDA error that says out of memory, or the CPU allocator's while the picture was decoded, was a
    # 500 "internal error" with a traceback in the log
    seed = {"decode": 31, "pixels": 32}[where]  # a picture of its own: not in the feature cache yet
    url = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(448, 448, seed=seed))).decode()
    body = chat_body("What is this?", max_tokens=5)
    body["messages"][0]["content"] = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    owner, name, at, error = {
        "decode": (server.worker.model, "forward", 3, _cuda_out_of_memory),  # the second decode step
        "pixels": (server.worker.reader, "pixels", 1, _cpu_out_of_memory),
    }[where]
    fail_once(monkeypatch, owner, name, error, at)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**body)
    error_body = err.value.body
    assert error_body["code"] == "generation_failed" and error_body["message"].startswith("out of memory")
    assert server.worker.alive
    monkeypatch.undo()
    # the same answer from the slot the failure left, and after other requests moved the slots
    first = client.chat.completions.create(**body).choices[0].message.content
    client.chat.completions.create(**chat_body("Something else entirely.", max_tokens=2))
    client.chat.completions.create(**chat_body("And another thing.", max_tokens=2))
    assert client.chat.completions.create(**body).choices[0].message.content == first


def test_a_full_queue_refuses_a_body_the_client_has_not_sent_yet(server):
    """The queue was checked only once the body was in: a client that asks before uploading
    (`Expect: 100-continue`, as curl does for bodies over 1 MiB) was told to go on ("100 Continue")
    and to send megabytes of pictures, only to get the 429 after them. It gets the 429 at once."""
    import socket

    worker = server.worker
    started, release = threading.Event(), threading.Event()

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    worker.on_start, server.options.queue_depth = hold, 0
    first = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/chat/completions",),
                             kwargs={"json": chat_body("one", max_tokens=4), "timeout": WAIT_S})  # fmt: skip
    first.start()
    try:
        assert started.wait(WAIT_S)  # running (held): no other may wait with depth 0
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            answer = b""
            while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
                answer += data
    finally:
        release.set()
        first.join(WAIT_S)
        worker.on_start, server.options.queue_depth = None, 8
    assert answer.startswith(b"HTTP/1.1 429 "), answer
