"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) as lm-eval's remote
tokenizer calls them: their shapes, their counts against what /v1/completions and
/v1/chat/completions report as usage.prompt_tokens, their refusals and the API key."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from internvl_chat.chat.session import HOPELESS_TEXT_MIN_CHARS
from internvl_chat.serve.tokenizer_api import MAX_TOKENIZE_TOKENS
from serve_support import RunningServer, chat_body, png_bytes

TEXT = "The quick brown fox<|im_end|> jumps over the lazy dog"


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kw)


def tokens(server, body: dict) -> list[int]:
    response = post(server, "/tokenize", body)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == server.loaded.model.max_seq_len
    return got["tokens"]


def usage_of(server, path: str, body: dict) -> int:
    response = post(server, path, {"model": "tiny", "max_tokens": 1, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_a_text_tokenizes_as_v1_completions_reads_it_special_tokens_as_tokens(server):
    ids = tokens(server, {"prompt": TEXT, "add_special_tokens": False})
    im_end = server.loaded.special.im_end
    assert im_end in ids  # the special token's text is that token, as /v1/completions reads it
    assert tokens(server, {"model": "tiny", "prompt": TEXT}) == ids
    assert usage_of(server, "/v1/completions", {"prompt": TEXT}) == len(ids)
    assert tokens(server, {"prompt": ""}) == []


def test_detokenize_gives_the_text_that_tokenizes_back_to_the_ids(server):
    ids = tokens(server, {"prompt": TEXT})
    response = post(server, "/detokenize", {"tokens": ids})
    assert response.status_code == 200 and response.json() == {"prompt": TEXT}


def test_messages_count_as_chat_counts_its_prompt_images_included(server):
    messages = chat_body("Describe it.")["messages"]
    assert len(tokens(server, {"messages": messages})) == usage_of(server, "/v1/chat/completions", {"messages": messages})
    picture = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                            {"type": "image_url", "image_url": {"url": data_url_of_png()}}]}]  # fmt: skip
    ids = tokens(server, {"messages": picture})
    assert ids.count(server.loaded.special.img_context) > 0
    assert len(ids) == usage_of(server, "/v1/chat/completions", {"messages": picture})


@pytest.mark.parametrize("salt", [5, "", "a\x00b"])
def test_a_bad_cache_salt_with_messages_is_a_400_as_in_chat(server, salt):
    """/tokenize's messages go through the chat prompt's namespace but not the sampling checks: a
    salt that is not a string was a 500 (AttributeError)."""
    messages = chat_body("Describe it.")["messages"]
    response = post(server, "/tokenize", {"messages": messages, "cache_salt": salt})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "cache_salt"


def test_a_conversation_past_the_context_is_counted_as_vllm_counts_it(server):
    """It was refused as chat refuses it (context_length_exceeded): a client measuring a conversation
    to trim it got no count, exactly when it needed one; count and max_model_len say it does not fit."""
    def overhead_and_count(text: str) -> tuple[int, int]:
        response = post(server, "/tokenize", {"messages": [{"role": "user", "content": text}]})
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["count"] == len(got["tokens"]) and got["max_model_len"] == server.loaded.model.max_seq_len
        return got["count"] - len(tokens(server, {"prompt": text})), got["count"]

    overhead, _ = overhead_and_count("hello")
    long_overhead, count = overhead_and_count("hello " * server.loaded.model.max_seq_len + "hello")
    assert count > server.loaded.model.max_seq_len and long_overhead == overhead


def test_a_conversation_past_the_tokenize_bound_is_refused_as_a_text_is(server, monkeypatch):
    from internvl_chat.serve import tokenizer_api

    monkeypatch.setattr(tokenizer_api, "MAX_TOKENIZE_TOKENS", 50)
    response = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hello " * 60}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "this server counts at most 50 in one request: send it in parts" in error["message"]


def data_url_of_png() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(np.full((40, 60, 3), 120, dtype=np.uint8))).decode()


def test_tokenizer_info_names_the_checkpoints_special_tokens(server):
    response = httpx.get(f"{server.url}/tokenizer_info", timeout=30)
    assert response.status_code == 200
    info = response.json()
    assert set(info) >= {"eos_token", "bos_token", "pad_token", "model_max_length"}
    assert info["model_max_length"] == server.loaded.model.max_seq_len
    eos = info["eos_token"]
    assert eos is not None and tokens(server, {"prompt": eos}) == [server.loaded.tokenizer.convert_tokens_to_ids(eos)]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": [1, 2]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False}, "add_generation_prompt"),
    # vLLM's: a count of another rendering than the one /v1/chat/completions answers (were ignored)
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ messages }}"}, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"prompt": "x", "return_token_strs": True}, "return_token_strs"),  # the answer had no token_strs
    ("/tokenize", {"messages": []}, "messages"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
])  # fmt: skip
def test_bad_requests_get_one_line_openai_errors(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and "\n" not in error["message"]


def test_a_text_past_the_bound_is_refused_before_it_is_tokenized(server, monkeypatch):
    monkeypatch.setattr(server.worker.prompts.tokenizer, "fewest_tokens", lambda text: MAX_TOKENIZE_TOKENS + 1)
    response = post(server, "/tokenize", {"prompt": "x" * HOPELESS_TEXT_MIN_CHARS})
    assert response.status_code == 400 and "at least" in response.json()["error"]["message"]


def test_an_unknown_model_is_refused(server):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        response = post(server, path, {"model": "other", **body})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_the_api_key_is_required_when_set(tiny_original):
    with RunningServer(tiny_original, api_key="sekrit") as keyed:
        for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                                   ("GET", "/tokenizer_info", None)):  # fmt: skip
            refused = httpx.request(method, f"{keyed.url}{path}", json=body, timeout=30)
            assert refused.status_code == 401
            ok = httpx.request(method, f"{keyed.url}{path}", json=body, headers={"Authorization": "Bearer sekrit"}, timeout=30)
            assert ok.status_code == 200


def test_the_tokenizer_endpoints_take_no_place_in_a_full_queue(server, monkeypatch):
    def full() -> None:
        raise AssertionError("the queue was asked")

    monkeypatch.setattr(server.worker, "check_capacity", full)
    assert tokens(server, {"prompt": "x"})
    assert post(server, "/detokenize", {"tokens": [1]}).status_code == 200


def test_the_404_of_an_unknown_endpoint_lists_the_tokenizer_endpoints(server):
    message = httpx.get(f"{server.url}/v1/tokenize", timeout=30).json()["error"]["message"]
    assert all(path in message for path in ("/tokenize", "/detokenize", "/tokenizer_info"))


def test_a_page_of_another_origin_cannot_post_without_a_preflight(server):
    sent = httpx.post(f"{server.url}/tokenize", content=b'{"prompt": "x"}', timeout=30,
                      headers={"Origin": "http://elsewhere.example", "Content-Type": "text/plain"})  # fmt: skip
    assert sent.status_code == 403 and sent.json()["error"]["code"] == "origin_not_allowed"
