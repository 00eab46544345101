"""Popular OpenAI-compatible clients' request shapes, replayed against `serve`, and the parts of the
answer each one reads.

Each case is the body a client builds for /v1/chat/completions (written here from reading where in
its source it builds it, named in the case's comment: no client is installed), sent as raw JSON so
every field, null and type is the client's own. The checks are what that client then reads from
the answer or the stream; a client that reads a field we leave out (`system_fingerprint`, say)
reads it as optional, and such fields are checked absent-or-null, as those clients accept.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest

from media_helpers import textured_rgb
from serve_support import png_bytes

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(96, 64, seed=3))).decode()
QUESTION = "What is in the picture?"
WAIT_S = 120


@dataclass
class Reply:
    """What came back: the JSON of a plain answer, or a stream's events (each parsed) and whether
    it ended with `[DONE]`."""

    status: int
    body: dict | None = None
    events: list[dict] = field(default_factory=list)
    done: bool = False


def send(server, body: dict, headers: dict | None = None) -> Reply:
    url = f"{server.url}/v1/chat/completions"
    if not body.get("stream"):
        response = httpx.post(url, json=body, headers=headers, timeout=WAIT_S)
        return Reply(response.status_code, body=response.json())
    reply = Reply(200)
    with httpx.stream("POST", url, json=body, headers=headers, timeout=WAIT_S) as response:
        reply.status = response.status_code
        if response.status_code != 200:
            response.read()
            reply.body = response.json()
            return reply
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                assert line == "", f"a line that is not an SSE data line: {line!r}"
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                reply.done = True
            else:
                assert not reply.done, "an event after [DONE]"
                reply.events.append(json.loads(data))
    return reply


# ---- what each client reads ----------------------------------------------------------------------


def reads_answer(reply: Reply, choices: int = 1) -> None:
    """A plain answer as openai-python's ChatCompletion (and LangChain's _create_chat_result, llm,
    lm-eval's parse_generations) read it: choices by index, message.content, finish_reason, usage."""
    assert reply.status == 200, reply.body
    out = reply.body
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"] == "tiny"
    assert out.get("system_fingerprint") is None  # optional in every client checked; read with .get
    assert sorted(c["index"] for c in out["choices"]) == list(range(choices))
    for c in out["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
        assert "logprobs" in c  # LangChain copies it when the key is there; null without logprobs
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"] > 0
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)  # LangChain's cache_read


def reads_stream(reply: Reply, with_usage: bool, choices: int = 1) -> str:
    """A stream as openai-python's Stream, LangChain's _convert_chunk_to_generation_chunk, llm's
    combine_chunks, Continue and Open WebUI read it: data lines of chunks with one id, choices[0]'s
    delta.content, one finish_reason per choice, `usage` on a last chunk with no choices when
    asked (and never a usage object before it), then [DONE]. Returns choice 0's text."""
    assert reply.status == 200, reply.body
    assert reply.done and reply.events
    assert len({e["id"] for e in reply.events}) == 1
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "tiny" for e in reply.events)
    assert all(isinstance(e["created"], int) and e.get("system_fingerprint") is None for e in reply.events)
    with_choices = [e for e in reply.events if e["choices"]]
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"  # llm keeps the role it last saw set
    finished = [e["choices"][0] for e in with_choices if e["choices"][0]["finish_reason"] is not None]
    assert sorted(c["index"] for c in finished) == list(range(choices))
    assert all(c["finish_reason"] in ("stop", "length") for c in finished)
    texts = [e["choices"][0]["delta"].get("content") for e in with_choices if e["choices"][0]["index"] == 0]
    assert all(t is None or isinstance(t, str) for t in texts)
    last = reply.events[-1]
    if with_usage:
        assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
        assert all(e["usage"] is None for e in reply.events[:-1])  # llm keeps the last usage it saw
    else:
        assert all(e.get("usage") is None for e in reply.events)
    return "".join(t or "" for t in texts)


# ---- the clients' request shapes -------------------------------------------------------------------


@dataclass
class Shape:
    body: dict
    check: Callable[[Reply], Any]
    headers: dict | None = None


def _user(text: str = QUESTION, **kw) -> dict:
    return {"role": "user", "content": text, **kw}


SHAPES = {
    # openai-python, the official client: `client.chat.completions.create(...)` sends what it is given
    # and drops NOT_GIVEN; its reasoning-era fields (developer role, max_completion_tokens) as it
    # documents them, with the headers every request of it carries (src/openai/_base_client.py)
    "openai-python": Shape(
        {"model": "tiny", "messages": [{"role": "developer", "content": "Answer briefly."}, _user()],
         "max_completion_tokens": 8, "seed": 7, "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2},
        lambda r: (reads_answer(r, choices=2),
                   [c["logprobs"]["content"][0]["top_logprobs"] for c in r.body["choices"]]),
        headers={"X-Stainless-Lang": "python", "X-Stainless-Retry-Count": "0", "OpenAI-Organization": "org-x"}),
    # openai-python: a conversation that resends the last answer as `message.model_dump()`, every
    # optional field of ChatCompletionMessage present as null (src/openai/types/chat/chat_completion_message.py)
    "openai-python resent message": Shape(
        {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [
            _user("Hi"),
            {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": None, "audio": None,
             "function_call": None, "tool_calls": None},
            _user("And now?")], "stop": "\nUser:"},
        reads_answer),
    # openai-python: a refusal resent as ChatCompletionMessage dumps it, content null beside it
    "openai-python resent refusal": Shape(
        {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [
            _user("Hi"), {"role": "assistant", "content": None, "refusal": "I can't help with that.", "tool_calls": []},
            _user("Then say hello.")]},
        reads_answer),
    # LangChain ChatOpenAI (libs/partners/openai/langchain_openai/chat_models/base.py: _default_params,
    # _convert_message_to_dict, _get_request_payload): model, stream false, n, temperature, the stop
    # list, a message's `name`, an AIMessage as an assistant message
    "langchain ChatOpenAI": Shape(
        {"model": "tiny", "stream": False, "n": 1, "temperature": 0.0, "max_tokens": 8, "stop": ["\nHuman:"],
         "messages": [{"role": "system", "content": "You are helpful."}, _user("Hi", name="alice"),
                      {"role": "assistant", "content": "Hello.", "name": "bot"}, _user(name="alice")]},
        reads_answer),
    # LangChain ChatOpenAI streaming with stream_usage (same file: _stream adds stream_options); it
    # reads chunk["usage"], a chunk with no choices, choice["delta"], finish_reason
    "langchain ChatOpenAI stream": Shape(
        {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
         "max_tokens": 8, "messages": [_user()]},
        lambda r: reads_stream(r, with_usage=True)),
    # simonw/llm (llm/default_plugins/openai_models.py: build_messages, _attachment, build_kwargs,
    # Chat.execute): an attachment as a text part plus an image_url part holding a data: URL, the
    # previous turn resent, stream_options.include_usage on every stream
    "simonw/llm": Shape(
        {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 6,
         "temperature": 0, "messages": [
             {"role": "system", "content": "Be terse."},
             _user("Hi"), {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                          {"type": "image_url", "image_url": {"url": IMAGE}}]}]},
        lambda r: reads_stream(r, with_usage=True)),
    # lm-evaluation-harness local-chat-completions (lm_eval/models/openai_completions.py:
    # LocalChatCompletion._create_payload, parse_generations): max_tokens, temperature 0, at most 4
    # stop strings (handle_stop_sequences: [] when a task has none), seed 1234
    "lm-eval local-chat-completions": Shape(
        {"messages": [_user("Question: 2+2?\nAnswer:")], "model": "tiny", "max_tokens": 8, "temperature": 0,
         "stop": ["\n\n", "Question:"], "seed": 1234},
        reads_answer),
    "lm-eval local-chat-completions, no until": Shape(
        {"messages": [_user("Question: 2+2?\nAnswer:")], "model": "tiny", "max_tokens": 8, "temperature": 0,
         "stop": [], "seed": 1234},
        reads_answer),
    # Open WebUI (backend/open_webui/routers/openai.py generate_chat_completion, utils/payload.py
    # apply_model_params_to_body_openai, apply_model_system_prompt_to_body): the model's system
    # prompt first, an uploaded image as a data: URL part, the user's parameters cast to float/int,
    # stop as a list, and a stream; it reads delta.content, usage when given, and [DONE]
    "Open WebUI": Shape(
        {"stream": True, "model": "tiny", "temperature": 0.0, "top_p": 0.9, "max_tokens": 8, "seed": 42,
         "stop": ["<|im_end|>"], "messages": [
             {"role": "system", "content": "You are a vision assistant."},
             {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                          {"type": "image_url", "image_url": {"url": IMAGE}}]}]},
        lambda r: reads_stream(r, with_usage=False)),
    # Open WebUI's background tasks (title, tags, follow-ups: utils/task.py, routers/tasks.py): not
    # streamed, one user message holding the whole task prompt
    "Open WebUI task": Shape(
        {"model": "tiny", "stream": False, "max_tokens": 8, "temperature": 0,
         "messages": [_user("### Task:\nGenerate a concise title for the chat.\n### Chat History:\nUSER: hi")]},
        reads_answer),
    # Continue (core/llm/llms/OpenAI.ts _convertArgs, core/llm/openaiTypeConverters.ts): messages
    # whose content is a list of text parts, an image part with `detail`, stop strings, top_p,
    # penalties at 0 when set in the config, always streamed
    "Continue": Shape(
        {"model": "tiny", "stream": True, "max_tokens": 8, "temperature": 0, "top_p": 1,
         "frequency_penalty": 0, "presence_penalty": 0, "stop": ["```\n\n", "<|im_end|>"], "messages": [
             {"role": "system", "content": [{"type": "text", "text": "You are a coding assistant."}]},
             {"role": "user", "content": [{"type": "text", "text": "Explain this screenshot."},
                                          {"type": "image_url", "image_url": {"url": IMAGE, "detail": "auto"}}]}]},
        lambda r: reads_stream(r, with_usage=False)),
    # LiteLLM's OpenAI-compatible provider (litellm/llms/openai/openai.py, the openai client under
    # it): the fields a caller passes go through as given: `user`, stream_options for usage, and
    # tool settings at their neutral values (tool_choice "none", no tools)
    "LiteLLM openai/": Shape(
        {"model": "tiny", "messages": [_user()], "stream": True, "stream_options": {"include_usage": True},
         "max_tokens": 8, "temperature": 0, "user": "team-a", "tool_choice": "none", "parallel_tool_calls": False,
         "response_format": {"type": "text"}},
        lambda r: reads_stream(r, with_usage=True)),
    # neutral values some clients send for fields they always fill: null stop, a text response_format,
    # an empty logit_bias, n null, logprobs false with top_logprobs 0 (OpenAI's defaults)
    "neutral defaults": Shape(
        {"model": "tiny", "messages": [_user()], "max_tokens": 6, "temperature": 0, "stop": None,
         "response_format": {"type": "text"}, "logit_bias": {}, "n": None, "logprobs": False, "top_logprobs": 0,
         "tools": [], "functions": None, "modalities": ["text"], "presence_penalty": 0.0,
         "frequency_penalty": 0.0, "store": False, "metadata": {"run": "x"}},
        reads_answer),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_client_request_shape_gets_the_answer_it_reads(server, name):
    shape = SHAPES[name]
    shape.check(send(server, shape.body, shape.headers))


def test_a_stream_and_an_answer_to_one_greedy_request_agree(server):
    """The stream's deltas joined are the plain answer's content (what every streaming client shows)."""
    body = {"model": "tiny", "messages": [_user("Tell me about colours.")], "max_tokens": 10, "temperature": 0}
    whole = send(server, body).body["choices"][0]["message"]["content"]
    streamed = reads_stream(send(server, {**body, "stream": True}), with_usage=False)
    assert streamed == whole


def test_an_empty_bearer_token_is_no_key_for_a_server_without_one(server):
    """lm-eval sends `Authorization: Bearer {OPENAI_API_KEY}`, "Bearer " when the variable is unset
    (lm_eval/models/api_models.py header); httpx refuses to send that value, http.client does."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    body = json.dumps({"model": "tiny", "messages": [_user()], "max_tokens": 4, "temperature": 0})
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer ", "Content-Type": "application/json"})
    response = conn.getresponse()
    reads_answer(Reply(response.status, body=json.loads(response.read())))
    conn.close()


def test_models_list_as_clients_read_it(server):
    """Open WebUI, Continue and LiteLLM list models through GET /v1/models: object list, data[].id."""
    out = httpx.get(f"{server.url}/v1/models", timeout=WAIT_S)
    assert out.status_code == 200
    body = out.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("tiny", "model")]
    assert isinstance(body["data"][0]["created"], int) and isinstance(body["data"][0]["owned_by"], str)


@pytest.mark.parametrize("name, body, param", [
    # what a client gets for a feature this server does not have: OpenAI's error object, status 400,
    # the field named (openai-python raises BadRequestError with it; LangChain and llm show the message)
    ("llm json_object", {"response_format": {"type": "json_object"}}, "response_format"),
    ("tools with a call asked for", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                     "tool_choice": "required"}, "tools"),
    ("a model the server does not serve", {"model": "gpt-4o-mini"}, "model"),
    # llm sends an attachment given as a URL as that URL (openai_models.py _attachment): fetched only
    # with --allow-remote-media, and the error names the part
    ("llm URL attachment", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages.0.content.1"),
])
def test_refusals_are_openai_error_objects(server, name, body, param):
    request = {"model": "tiny", "messages": [_user()], "max_tokens": 4, **body}
    reply = send(server, request)
    assert reply.status in (400, 404)
    error = reply.body["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def _sampled(server, seed: int) -> Reply:
    body = {"model": "tiny", "messages": [_user("Tell me a story.")], "max_tokens": 12, "temperature": 1.5,
            "seed": seed, "return_token_ids": True}
    return send(server, body)


def test_a_negative_seed_in_openais_int64_range_is_a_seed_like_any_other(server):
    """OpenAI takes any int64 seed (openai-python and LangChain pass an int as given); a negative one
    was a 400. It is read modulo 2**63, so -1 is 2**63-1: reproducible, not llama.cpp's 'random'."""
    below = _sampled(server, -1)
    reads_answer(below)
    assert below.body["choices"][0]["token_ids"] == _sampled(server, 2**63 - 1).body["choices"][0]["token_ids"]
    reads_answer(_sampled(server, -(2**63)))
    refused = _sampled(server, -(2**63) - 1)
    assert refused.status == 400 and refused.body["error"]["param"] == "seed"
    assert "-9223372036854775808" in refused.body["error"]["message"]


def test_a_browser_preflight_gets_no_cors_headers(server):
    """What the README tells users of browser-side clients: with no --allow-origin (the default),
    no CORS, so a web page's fetch is blocked by its browser (the preflight a JSON POST with a key
    needs is refused). test_serve_cors.py has the origins it allows."""
    response = httpx.options(f"{server.url}/v1/chat/completions", timeout=WAIT_S, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 405
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
