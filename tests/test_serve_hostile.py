"""`internvl-chat serve` against requests built to hurt it: every refusal is one OpenAI-shaped
error that says what to do, costs little, and shows no control character the client sent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from internvl_chat.chat.template import PromptBuilder

WAIT_S = 60
ROOT = Path(__file__).resolve().parents[1]


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
    original = PromptBuilder.message  # each message's block (serve/conversation.py)

    def counting(self, *args, **kw):
        built.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(PromptBuilder, "message", counting)
    turns = 5000
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * turns
    response = post(server, {"model": "tiny", "messages": [*messages, {"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "(counted up to messages." in error["message"] and "context holds 4,096" in error["message"], error["message"]
    assert 0 < len(built) < turns // 2  # the turns past the context were never built


@pytest.mark.parametrize(
    "messages, counted_to",
    [
        ([{"role": "user", "content": "x" * (1 << 20)}], 0),
        ([{"role": "system", "content": "x" * (1 << 20)}, {"role": "user", "content": "Hi"}], 1),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * (1 << 20)},
          {"role": "user", "content": "Hi"}], 1),
    ],
    ids=["user", "system", "assistant"],
)  # fmt: skip
def test_a_text_that_cannot_fit_is_refused_before_it_is_tokenized(server, monkeypatch, messages, counted_to):
    """A message of megabytes was tokenized before its refusal: tens of them under the body limit
    took a minute and gigabytes, holding the tokenizer's lock that every request's prompt needs."""
    tokenizer = server.worker.prompts.tokenizer
    encoded = []
    real = type(tokenizer).encode
    monkeypatch.setattr(type(tokenizer), "encode", lambda self, text: encoded.append(len(text)) or real(self, text))
    response = post(server, {"model": "tiny", "messages": messages, "max_tokens": 4})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"(counted up to messages.{counted_to})" in error["message"], error["message"]
    assert max(encoded, default=0) < 1000  # the megabyte never reached the tokenizer


@pytest.mark.parametrize("fits", [False, True], ids=["refused", "answered"])
def test_the_server_keeps_no_system_message_after_its_request(server, fits):
    """Each distinct system message was kept (as the key of a cached prompt builder, 65 of them)
    after its request, a refused one of tens of megabytes too: a few requests held gigabytes."""
    import sys

    from internvl_chat.serve.errors import APIError
    from internvl_chat.serve.protocol import parse_request

    text = "Be brief. " * (10 if fits else 1 << 17)
    body = {"model": "tiny", "messages": [{"role": "system", "content": text}, {"role": "user", "content": "Hi"}]}
    req = parse_request(json.dumps(body).encode())
    system = req.messages[0].content
    held = sys.getrefcount(system)
    try:
        server.worker.prompts.make(req)
    except APIError as e:
        assert not fits and e.code == "context_length_exceeded", e
    assert sys.getrefcount(system) == held

@pytest.mark.parametrize("where", ["one message", "the history"])
def test_a_request_over_the_media_limit_is_refused_before_its_media_are_read(server, monkeypatch, where):
    """Each picture was fetched and probed (a temporary file each) before the count was checked: a
    64 MiB body of distinct one-pixel GIFs kept a CPU busy for minutes to be refused."""
    import base64

    read = []
    for kind in ("image", "video"):
        real = getattr(server.worker.reader, kind)
        monkeypatch.setattr(server.worker.reader, kind, lambda *a, real=real: read.append(1) or real(*a))
    limit = 4
    monkeypatch.setattr(server.options, "max_images", limit)
    gif = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=")
    urls = [f"data:image/gif;base64,{base64.b64encode(gif + bytes([n])).decode()}" for n in range(limit + 8)]
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    if where == "one message":
        messages = [{"role": "user", "content": parts}]
    else:  # the limit's worth in earlier messages, then one message of many
        messages = [{"role": "user", "content": [part]} for part in parts[:limit]] + [{"role": "user", "content": parts[limit:]}]
    response = post(server, {"model": "tiny", "messages": messages, "max_tokens": 2})
    assert response.status_code == 400
    assert f"more than {limit} images and videos" in error_of(response)["message"]
    assert len(read) <= limit  # what the limit allows, at most: never the parts past it


@pytest.mark.parametrize(
    "change",
    [{"messages": [{"role": "robot"}] * 2000}, {"messages": [{"role": "user", "content": [{"type": "x"}] * 2000}]},
     {"messages": [{"role": "user", "content": [{"type": "text"}] * 2000}]}, {"stop": [1] * 2000}],
    ids=["messages", "parts", "fields", "stop"],
)  # fmt: skip
def test_a_body_of_many_bad_messages_is_refused_at_the_first(monkeypatch, change):
    """Every bad message or part was validated and reported (then one of them shown): 12 MiB of
    parts with an unknown type took 10 s and 2.4 GB to refuse, 64 MiB would exhaust the memory."""
    from pydantic import ValidationError

    from internvl_chat.serve import protocol
    from internvl_chat.serve.errors import APIError

    found = []
    real = protocol.ChatCompletionRequest.model_validate_json

    def validate(body):
        try:
            return real(body)
        except ValidationError as e:
            found.append(e.error_count())
            raise

    monkeypatch.setattr(protocol.ChatCompletionRequest, "model_validate_json", validate)
    with pytest.raises(APIError) as err:
        protocol.parse_request(json.dumps({"model": "tiny", "messages": [{"role": "user"}], **change}).encode())
    assert err.value.status == 400 and err.value.param.startswith(("messages.0", "stop.0"))
    assert found and found[0] < 10, found



def _json_items_body(count: int, item: bytes = b'{"role":"user"}') -> bytes:
    """A request of `count` messages (or list items), ~two counted bytes each."""
    return b'{"model":"tiny","messages":[' + ((item + b",") * count)[:-1] + b'],"max_tokens":4}'


@pytest.mark.parametrize(
    "body",
    [_json_items_body(600_000, b"{}"), _json_items_body(600_000),
     b'{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"stop":[' + b"0," * 1_100_000 + b'0]}'],
    ids=["empty-objects", "messages", "numbers"],
)  # fmt: skip
def test_a_body_of_millions_of_tiny_items_is_refused_before_it_is_parsed(server, monkeypatch, body):
    """Parsing builds the whole JSON tree before any field is checked: 64 MiB of `{"role":"user"},…`
    took 2.6 GB (and 14 s), of `0,0,…` in a list 1.5 GB, even when the first item was already wrong."""
    from internvl_chat.serve import protocol

    parsed = []
    real = protocol.ChatCompletionRequest.model_validate_json
    monkeypatch.setattr(protocol.ChatCompletionRequest, "model_validate_json", lambda body: parsed.append(1) or real(body))
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=WAIT_S)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "request_too_large" and "send fewer messages, parts or list items" in error["message"], error
    assert f"at most {protocol.MAX_JSON_ITEMS:,}" in error["message"] and not parsed


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident size from /proc")
def test_refusing_a_body_of_tiny_items_takes_no_memory(tmp_path):
    """8 MiB of one-field messages took ~320 MB to parse. Measured in a child as its peak resident
    size, VmHWM: ru_maxrss would start from the size of this process, inherited across fork and exec."""
    body = tmp_path / "body.json"
    body.write_bytes(_json_items_body(530_000))  # 8 MiB
    code = f"""
        import json, pathlib, re
        from internvl_chat.serve.errors import APIError
        from internvl_chat.serve.protocol import parse_request
        def peak_kib():
            return int(re.search(r"VmHWM:\\s*(\\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1))
        body = pathlib.Path({str(body)!r}).read_bytes()
        before = peak_kib()
        try:
            parse_request(body)
            status = 200
        except APIError as e:
            status = e.status
        print(json.dumps(dict(status=status, grew_kib=peak_kib() - before)))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["status"] == 413 and got["grew_kib"] < 64 << 10, got  # under 64 MB, not hundreds


def test_large_real_bodies_are_not_counted_as_too_many_items():
    """Base64 media has no '{', '[' or ','; text keeps its own: a megabyte of dense code must pass."""
    from internvl_chat.serve.protocol import MAX_JSON_ITEMS, parse_request

    code = "def f(a, b):\n    return {'k': [a, b], 'v': (a, b)}\n" * 20_000  # 1 MB, 7 items a line
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo+/" * 3_000_000}}
    history = [{"role": role, "content": f"turn {k}, with {{braces}} and [brackets]"}
               for k in range(500) for role in ("user", "assistant")]  # fmt: skip
    last = {"role": "user", "content": [{"type": "text", "text": code}, image]}
    body = json.dumps({"model": "tiny", "messages": [*history, last]})
    items = sum(body.count(c) for c in "{[,")
    assert 100_000 < items < MAX_JSON_ITEMS  # the check counts it, and it stays under the limit
    req = parse_request(body.encode())
    assert len(req.messages) == 1001 and req.messages[-1].content[0].text == code


def test_json_nested_too_deep_is_a_400_that_says_so(server):
    """The parser's recursion limit, not a RecursionError's 500."""
    nested = b"[" * 5000 + b"]" * 5000
    body = b'{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"mm_processor_kwargs":{"a":%s}}' % nested
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=WAIT_S)
    assert response.status_code == 400
    assert "nests deeper than this server reads" in error_of(response)["message"]


CONTROLS = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\u202e"  # clear screen, write the clipboard, reverse the text


@pytest.mark.parametrize(
    "change, param",
    [
        ({"messages": [{"role": "user", "content": [{"type": CONTROLS + "a" * 5000, "text": "x"}]}]}, "messages.0.content.0"),
        ({"model": CONTROLS + "m" * 5000}, "model"),
    ],
    ids=["part-type", "model"],
)
def test_refusals_quote_what_the_client_sent_escaped_and_short(server, change, param):
    """pydantic's message for an unknown part type and the 404 for a model quoted the client's
    text whole, escape sequences and all, to a client that may print them to a terminal."""
    response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **change})
    assert response.status_code in (400, 404)
    error = error_of(response)
    message = error["message"]
    assert error["param"] == param
    assert message.isprintable() and "\u202e" not in message, message
    assert "\\e[2J" in message and len(message) < 400, message


def test_a_model_card_that_does_not_exist_is_quoted_escaped(server):
    response = httpx.get(f"{server.url}/v1/models/%1b%5b2J{'m' * 5000}", timeout=WAIT_S)
    assert response.status_code == 404
    message = error_of(response)["message"]
    assert "\\e[2J" in message and message.isprintable() and len(message) < 400, message


def test_a_missing_local_file_is_named_escaped(server, tmp_path):
    server.options.allow_local_media = tmp_path.resolve()
    try:
        url = f"file://{tmp_path}/%1b%5b2J%e2%80%ae{'n' * 3000}.png"
        image = {"type": "image_url", "image_url": {"url": url}}
        response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": [image]}], "max_tokens": 4})
    finally:
        server.options.allow_local_media = None
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "does not exist" in message and "\\e[2J" in message and message.isprintable() and len(message) < 400, message


def _raw_exchange(server, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize(
    "data, said",
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, "not valid HTTP/1.1"),  # a TLS hello
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}", "not valid HTTP/1.1"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (20 << 10), "over this server's 16 KiB limit"),
    ],
    ids=["tls", "negative-length", "long-head"],
)
def test_a_request_that_is_not_http_gets_an_openai_shaped_400(server, data, said):
    """uvicorn answered these in text/plain ("Invalid HTTP request received.")."""
    head, _, body = _raw_exchange(server, data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and said in error["message"], error
    assert httpx.get(f"{server.url}/health", timeout=WAIT_S).status_code == 200  # and the server goes on


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket", b"TLS/1.2"])
def test_an_upgrade_request_is_answered_over_http_1_1_and_logs_nothing(server, upgrade):
    """`curl --http2 http://...` asks to upgrade to h2c: uvicorn answered over HTTP/1.1, as it may,
    but logged two warnings for every such request, the second telling the operator to install a
    WebSocket library (the server has no WebSocket endpoint: installing one changes nothing)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "internvl_chat.serve")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        head, _, body = _raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
                                      b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n").partition(b"\r\n\r\n")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"status": "ok"}, head
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_a_seed_over_the_range_names_the_exact_bound(server):
    response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 2**63})
    assert response.status_code == 400
    assert "9223372036854775807" in error_of(response)["message"]  # not a float's 9223372036854776000


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_a_number_that_is_not_finite_is_called_so(server, field, number):
    """JSON's NaN was refused with "should be greater than or equal to 0", which it is not told to be."""
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "%s": %s}' % (
        field.encode(), number)
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=WAIT_S)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == field and "finite number" in error["message"], error


_HUGE = "9" * 4000  # JSON's integers may have thousands of digits (the parser stops past ~4,300)
_CHAT = '{"model":"tiny","messages":[{"role":"user","content":"Hi"}],%s}'


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", _CHAT % f'"n":{_HUGE}', "n"),
    ("/v1/chat/completions", _CHAT % f'"n":-{_HUGE}', "n"),
    ("/v1/chat/completions", _CHAT % f'"logprobs":true,"top_logprobs":{_HUGE}', "top_logprobs"),
    ("/v1/chat/completions", _CHAT % f'"max_tokens":{_HUGE}', "max_tokens"),
    ("/v1/chat/completions", _CHAT % f'"max_completion_tokens":{_HUGE}', "max_completion_tokens"),
    ("/v1/completions", f'{{"model":"tiny","prompt":"Hi","logprobs":{_HUGE}}}', "logprobs"),
    ("/v1/completions", f'{{"model":"tiny","prompt":[1,{_HUGE}]}}', "prompt"),
    ("/detokenize", f'{{"tokens":[1,-{_HUGE}]}}', "tokens"),
])  # fmt: skip
def test_a_huge_integer_is_quoted_cut_to_its_first_digits_and_length(server, path, body, param):
    """Each refusal repeated the number whole: a message of 4,000 to 5,300 characters."""
    response = httpx.post(f"{server.url}{path}", content=body, timeout=WAIT_S, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and "9" * 20 + "… (a number of 4,000 digits)" in error["message"]
    assert len(error["message"]) < 300, error["message"]


def test_an_integer_past_what_the_parser_reads_is_not_called_invalid_json(server):
    # "the request body is not valid JSON (Invalid JSON: number out of range …)": it is valid JSON
    response = httpx.post(f"{server.url}/v1/chat/completions", content=_CHAT % f'"n":{"9" * 5000}', timeout=WAIT_S,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert message.startswith("the request body holds an integer of thousands of digits (") and "range" in message


def test_a_frame_list_over_the_frame_limit_is_told_how_many_to_send(server):
    # it said "the video has 65 frames, over this server's limit of 64" and no more
    import base64

    import numpy as np
    from serve_support import png_bytes

    frame = base64.b64encode(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))).decode()
    limit = server.options.max_frames
    url = "data:video/jpeg;base64," + ",".join([frame] * (limit + 1))
    response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}]}]})  # fmt: skip
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "messages.0.content.0"
    assert error["message"].endswith(f"over this server's limit of {limit}; send at most {limit} (sample fewer frames)")


def test_a_local_url_outside_the_folder_does_not_say_whether_the_file_exists(server, tmp_path):
    """With --allow-local-media, a missing file outside the folder was "does not exist" (400) and an
    existing one "outside the folder" (403): any path on the machine could be probed."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    server.options.allow_local_media = allowed.resolve()
    answers = {}
    try:
        for name, url in [("exists", f"file://{tmp_path}/secret.png"), ("missing", f"file://{tmp_path}/missing.png"),
                          ("missing-inside", f"file://{allowed}/missing.png"), ("relative", "file:allowed/x.png")]:  # fmt: skip
            image = {"type": "image_url", "image_url": {"url": url}}
            answers[name] = post(server, {"model": "tiny", "messages": [{"role": "user", "content": [image]}], "max_tokens": 4})
    finally:
        server.options.allow_local_media = None
    assert answers["exists"].status_code == answers["missing"].status_code == 403
    assert error_of(answers["exists"]) == error_of(answers["missing"])
    assert answers["missing-inside"].status_code == 400 and "does not exist" in error_of(answers["missing-inside"])["message"]
    assert answers["relative"].status_code == 400 and "absolute path" in error_of(answers["relative"])["message"]


def test_a_trailing_slash_is_an_openai_shaped_404_not_a_redirect_to_the_host_header(server):
    response = httpx.post(f"{server.url}/v1/chat/completions/", json={"model": "tiny"}, timeout=WAIT_S,
                          headers={"Host": "evil.example"})  # fmt: skip
    assert response.status_code == 404 and "location" not in response.headers
    assert "/v1/chat/completions" in error_of(response)["message"]


def test_health_answers_head_as_monitors_send_it(server):
    response = httpx.head(f"{server.url}/health", timeout=WAIT_S)
    assert response.status_code == 200 and response.content == b""
    assert httpx.get(f"{server.url}/health", timeout=WAIT_S).json() == {"status": "ok"}


def test_a_content_part_without_a_type_is_told_the_types_there_are(server):
    parts = [{"text": "Hi"}]
    response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 4})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "messages.0.content.0" and "'text', 'image_url' or 'video_url'" in error["message"], error


def test_a_video_that_cannot_be_read_is_called_the_video(server):
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + "A" * 4000}}
    response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": [video]}], "max_tokens": 4})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert message.startswith("cannot read the video (") and "the media" not in message, message


@pytest.mark.parametrize(
    "method, path, allowed",
    [("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET, HEAD"), ("DELETE", "/v1/models/tiny", "GET, HEAD"),
     ("POST", "/health", "GET, HEAD")],
)  # fmt: skip
def test_a_method_an_endpoint_does_not_take_is_a_405_that_names_the_ones_it_does(server, method, path, allowed):
    """Our JSON 405 dropped the Allow header that HTTP requires (Starlette's own has it) and did
    not say which method to use."""
    response = httpx.request(method, f"{server.url}{path}", timeout=WAIT_S)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert error_of(response)["message"] == f"method not allowed on this endpoint; it takes {allowed}"


_HI = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi é"}], "max_tokens": 2}, ensure_ascii=False)


@pytest.mark.parametrize(
    "body, said",
    [
        (b"", "the request body is empty; send the chat request as a JSON object (model, messages)"),
        (b" \r\n", "the request body is empty; send the chat request as a JSON object (model, messages)"),
        (b"\xef\xbb\xbf" + _HI.encode(), "starts with a byte-order mark (bytes EF BB BF); send the JSON without it"),
        (_HI.encode("latin-1"), f"is not UTF-8 (byte 0xE9 at offset {_HI.index('é')}); send the JSON encoded as UTF-8"),
        (_HI.encode("utf-16"), "is not UTF-8 (byte 0xFF at offset 0); send the JSON encoded as UTF-8"),
        (_HI.replace("é", "\\ud83d").encode(), "holds half of a character, a \\uD800-\\uDFFF escape without its pair"),
        (_HI.replace("é", "\\ude00x").encode(), "holds half of a character, a \\uD800-\\uDFFF escape without its pair"),
    ],
    ids=["empty", "blank", "byte-order mark", "latin-1", "utf-16", "lone high surrogate", "lone low surrogate"],
)
def test_a_body_that_is_not_utf8_json_says_what_to_fix(server, body, said):
    """The parser's words for these were "EOF while parsing a value" (no body), "expected value at
    line 1 column 1" (a byte-order mark, UTF-16), "invalid unicode code point" (a Latin-1 byte) and
    "unexpected end of hex escape" (text cut inside an emoji, which JSON.stringify writes as a lone
    \\ud83d): none said what to fix."""
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=WAIT_S,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    assert said in error_of(response)["message"], error_of(response)["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
@pytest.mark.parametrize("coding", ["gzip", "br", "gzip, identity"])
def test_a_compressed_body_is_a_415_that_says_to_send_it_uncompressed(server, path, coding):
    """A gzip body was read as JSON: "the request body is not UTF-8 (byte 0x8B at offset 1); send the
    JSON encoded as UTF-8" told the client to re-encode its text, not to stop compressing it."""
    import gzip

    body = gzip.compress(json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1}).encode())
    response = httpx.post(f"{server.url}{path}", content=body, timeout=WAIT_S,
                          headers={"Content-Type": "application/json", "Content-Encoding": coding})  # fmt: skip
    assert response.status_code == 415 and response.headers["accept-encoding"] == "identity"
    error = error_of(response)
    assert error["code"] == "unsupported_content_encoding" and error["type"] == "invalid_request_error"
    assert f"(Content-Encoding: {coding}); " in error["message"] and "send it uncompressed" in error["message"]


def test_a_body_marked_identity_is_read_as_it_is(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S,
                          headers={"Content-Encoding": "identity"})  # fmt: skip
    assert response.status_code == 200, response.text


def test_an_answer_holding_unicode_line_ends_streams_one_line_per_event(server):
    """json.dumps leaves U+0085, U+2028 and U+2029 raw; httpx's iter_lines (as str.splitlines) ends
    a line at each, so a client reading the stream by lines got half an event that was not JSON."""
    written = "a\x85b\u2028c\u2029d"

    def write(job, event):  # the model's text, as if it had written these
        if event["text"]:
            event["text"] = written

    server.worker.on_event = write
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=WAIT_S) as response:
            lines = [line for line in response.iter_lines() if line]
    finally:
        server.worker.on_event = None
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]  # each line a whole event
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text and text.replace(written, "") == ""  # each token's text came whole


def test_an_engine_failure_is_a_500_whose_message_is_escaped_and_short(server):
    """The engine's catch-all quoted the exception's text as it was: control characters and all,
    however long (an exception may quote what a request held)."""

    def fail(job):
        raise RuntimeError("\x1b]0;pwned\x07 " + "x" * 5000)

    server.worker.on_start = fail
    try:
        response = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    finally:
        server.worker.on_start = None
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "internal_error" and error["message"].startswith("internal error (RuntimeError: \\e]0;pwned\\x07 xx")
    assert len(error["message"]) < 300 and "\x1b" not in error["message"] and "\x07" not in error["message"]
    assert post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("content", {"type": "text", "text": "Hi"},
         'messages.0.content must be a string or a list of content parts, such as [{"type": "text", "text": "Hi"}]'),
        ("content", 5, 'messages.0.content must be a string or a list of content parts'),
        ("stop", {"at": "\n"}, "stop must be a string or a list of strings"),
    ],
    ids=["a part not in a list", "a number", "stop as an object"],
)  # fmt: skip
def test_a_field_that_is_neither_a_string_nor_a_list_is_told_it_takes_either(server, field, value, said):
    """pydantic's first member only was named: a content part sent without its list was told
    "Input should be a valid string"."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    if field == "content":
        body["messages"][0]["content"] = value
    else:
        body[field] = value
    response = post(server, body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["message"].startswith(said) and error["param"] == said.split(" ")[0], error
