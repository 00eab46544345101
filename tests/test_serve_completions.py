"""The legacy text endpoint, POST /v1/completions: through the official `openai` client
(`client.completions.create`) and as lm-evaluation-harness's `local-completions` model sends it.

Answers and log-probabilities are checked against a direct forward of the same tiny checkpoint (a
second copy, float32 on the CPU): greedy continuations token by token, and the prompt's scored
tokens against one full forward's log_softmax (the engine's scored prefill computes them a few rows
at a time, over several prefill chunks here).
"""

from __future__ import annotations

import json
import socket
import threading
import math
from operator import itemgetter

import httpx
import openai
import pytest
import torch

from internvl_chat.chat import sampling
from internvl_chat.engine import model as engine_model
from internvl_chat.engine.loader import load_model
from internvl_chat.serve.logprobs import Entry
from internvl_chat.serve.text_completions import DEFAULT_MAX_TOKENS, MAX_PROMPTS, LegacyLogprobs
from fault_helpers import fail_once
from serve_support import RunningServer

TEXT = "The quick brown fox jumps over the lazy dog, and then"
OTHER_TEXT = "Numbers in order: one, two, three, four, five, six, seven, eight, nine and ten."
LONG_TEXT = "Colours of the rainbow: red, orange, yellow, green, blue, indigo and violet. " * 4
WAIT_S = 120


@pytest.fixture(scope="module")
def local(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096)


@pytest.fixture(scope="module")
def stop_ids(server) -> set[int]:
    return set(server.prompt_builder().stop_ids)


def full_logprobs(local, ids: list[int]) -> torch.Tensor:
    """log_softmax of every position's logits, from one forward of the whole text."""
    with torch.inference_mode():
        return local.model.forward(ids, 0, all_logits=True).float().log_softmax(-1)


def greedy(local, ids: list[int], steps: int, stops: set[int]) -> tuple[list[int], str]:
    """The greedy continuation, one full forward per token (the image tokens and <|im_start|> banned, as the
    sampler bans them)."""
    special = local.special
    out: list[int] = []
    for _ in range(steps):
        logits = full_logprobs(local, ids + out)[-1].clone()
        logits[[special.img_start, special.img_end, special.img_context, special.im_start]] = -math.inf
        token = int(logits.argmax())
        if token in stops:
            return out, "stop"
        out.append(token)
    return out, "length"


def assert_top(top: dict[str, float], row: torch.Tensor, k: int, own: float) -> None:
    """A legacy `top_logprobs` dict: the k most likely tokens and the token itself (`own`), at most
    k + 1 keys (fewer where texts coincide, each U+FFFD alone), its largest value the position's."""
    assert 1 <= len(top) <= k + 1
    assert max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
    kth = float(torch.topk(row, k).values[-1])
    assert all(v >= kth - 1e-4 or v == own for v in top.values())
    assert own in top.values()


def assert_offsets(logprobs, text: str) -> None:
    """Each token's `text_offset` is where its text stands in the choice's text (a token holding
    part of a character, shown as U+FFFD alone, is only checked to be in order)."""
    offsets = logprobs.text_offset
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, offset in zip(logprobs.tokens, offsets):
        if "\ufffd" not in token:
            assert text[offset : offset + len(token)] == token


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S)


# ---- plain completions ---------------------------------------------------------------------------


def test_a_text_prompt_is_continued_as_it_is_without_a_chat_template(client, local, stop_ids):
    answer = client.completions.create(model="tiny", prompt=TEXT, max_tokens=8, temperature=0)
    ids = local.tokenizer.encode(TEXT)
    expected, reason = greedy(local, ids, 8, stop_ids)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.usage.prompt_tokens == len(ids)  # the text's own tokens: no template around them
    assert answer.usage.completion_tokens == len(expected)
    [choice] = answer.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, local.tokenizer.decode(expected), reason)
    assert choice.logprobs is None


def test_max_tokens_defaults_to_openais_sixteen(client):
    answer = client.completions.create(model="tiny", prompt=TEXT, temperature=0)
    assert answer.usage.completion_tokens <= DEFAULT_MAX_TOKENS
    assert answer.usage.completion_tokens == DEFAULT_MAX_TOKENS or answer.choices[0].finish_reason == "stop"


def test_token_id_prompts_and_texts_give_one_choice_per_prompt_and_n_in_order(client, local, stop_ids):
    first, second = local.tokenizer.encode(TEXT), local.tokenizer.encode("Red, green and")
    answer = client.completions.create(model="tiny", prompt=[first, second], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for number, ids in enumerate((first, second)):
        expected = local.tokenizer.decode(greedy(local, ids, 4, stop_ids)[0])
        assert [c.text for c in answer.choices[2 * number : 2 * number + 2]] == [expected, expected]
    assert answer.usage.prompt_tokens == len(first) + len(second)  # each prompt counted once
    texts = client.completions.create(model="tiny", prompt=[TEXT, "Red, green and"], max_tokens=4, temperature=0)
    assert [c.text for c in texts.choices] == [answer.choices[0].text, answer.choices[2].text]


def test_a_seeded_sample_is_reproducible_and_each_choice_has_its_own(client):
    kw = dict(model="tiny", prompt=TEXT, max_tokens=12, temperature=1.0, seed=7, n=2)
    one, two = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert one.choices[0].text != one.choices[1].text


def test_a_completion_s_ids_are_never_given_to_another_conversation_that_resends_its_text(server, local, tiny_original):
    """The answer memory gives back our ids for a reply's text; an answer generated after another
    prompt (here a /v1/completions one) must not become the ids of a chat conversation that merely
    holds the same text: that conversation's prompt (and answer) would depend on what another client
    ran before it. It is read as a fresh server reads it."""
    said = post(server, {"model": "tiny", "prompt": "The cat", "max_tokens": 6, "temperature": 0}).json()["choices"][0]["text"]
    ids = server.worker.answers.lookup(said)
    assert ids is not None and ids != local.tokenizer.encode(said)  # the text alone tokenizes otherwise
    conversation = {"model": "tiny", "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": said},
                                 {"role": "user", "content": "And then?"}]}  # fmt: skip
    with RunningServer(tiny_original, slots=1) as fresh:
        wanted = httpx.post(f"{fresh.url}/v1/chat/completions", json=conversation, timeout=WAIT_S).json()
    served = httpx.post(f"{server.url}/v1/chat/completions", json=conversation, timeout=WAIT_S).json()
    assert served["usage"]["prompt_tokens"] == wanted["usage"]["prompt_tokens"]
    assert served["choices"][0]["message"]["content"] == wanted["choices"][0]["message"]["content"]


def test_a_stop_string_cuts_the_text(client, local, stop_ids):
    full = local.tokenizer.decode(greedy(local, local.tokenizer.encode(TEXT), 12, stop_ids)[0])
    cut = full[3:6]
    answer = client.completions.create(model="tiny", prompt=TEXT, max_tokens=12, temperature=0, stop=[cut])
    assert answer.choices[0].text == full[: full.index(cut)]
    assert answer.choices[0].finish_reason == "stop"


def test_generated_logprobs_are_the_legacy_shape(client, local, stop_ids):
    answer = client.completions.create(model="tiny", prompt=TEXT, max_tokens=6, temperature=0, logprobs=3)
    ids = local.tokenizer.encode(TEXT)
    generated, _ = greedy(local, ids, 6, stop_ids)
    logprobs = answer.choices[0].logprobs
    reference = full_logprobs(local, ids + generated)
    assert "".join(logprobs.tokens) == answer.choices[0].text
    for k, (token, value, top) in enumerate(zip(generated, logprobs.token_logprobs, logprobs.top_logprobs)):
        row = reference[len(ids) - 1 + k]
        assert value == pytest.approx(float(row[token]), abs=1e-4)
        assert_top(top, row, 3, value)
    assert_offsets(logprobs, answer.choices[0].text)


def force_token_at_step(monkeypatch, token: int, step: int) -> None:
    """The sampler's `step`-th pick (from 0, in every answer) sees `token` far ahead of the rest."""
    force_tokens(monkeypatch, {step: token})


def force_tokens(monkeypatch, forced: dict[int, int]) -> None:
    """The sampler's pick `step` (from 0, in every answer) sees `forced[step]` far ahead of the rest."""
    real, steps = sampling.Sampler.next_token, {}

    def next_token(self, logits):
        n = steps[id(self)] = steps.get(id(self), -1) + 1
        if n in forced:
            logits = logits.clone()
            logits.reshape(-1)[forced[n]] = float(logits.max()) + 50
        return real(self, logits)

    monkeypatch.setattr(sampling.Sampler, "next_token", next_token)


@pytest.mark.parametrize("stream", [False, True])
def test_a_special_token_the_answer_s_text_leaves_out_takes_no_characters_in_text_offset(server, local, stop_ids,
                                                                                           monkeypatch, stream):  # fmt: skip
    special = local.special
    banned = {special.img_start, special.img_end, special.img_context, special.im_start}
    quiet = min(set(local.tokenizer.special_ids) - stop_ids - banned)  # listed as its text, which the answer never shows
    force_token_at_step(monkeypatch, quiet, 1)
    client = server.client()
    kw = dict(model="tiny", prompt=TEXT, max_tokens=4, temperature=0, logprobs=1, echo=True)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
        text = "".join(c.text for c in chunks)
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    prompt = len(local.tokenizer.encode(TEXT))
    named = local.tokenizer.decode([quiet])
    assert tokens[prompt + 1] == named and named not in text
    assert offsets[prompt + 1] == offsets[prompt + 2] == len(TEXT) + len(tokens[prompt])  # where the next token's text begins
    shown = [(t, o) for i, (t, o) in enumerate(zip(tokens, offsets)) if i != prompt + 1]
    assert "".join(t for t, _ in shown) == text
    assert all(text[o : o + len(t)] == t for t, o in shown)


@pytest.mark.parametrize("stream", [False, True])
def test_the_stop_token_after_a_character_left_unfinished_stands_at_the_end_of_the_text(server, local, stop_ids,
                                                                                         monkeypatch, stream):  # fmt: skip
    """The answer ends in a character's first byte, then the stop token: the text ends in its U+FFFD,
    and the listed stop token (no text of its own) stands after it, at the text's end."""
    lead = next(i for i in range(100_000) if local.tokenizer.token_bytes(i) == b"\xc3")
    stop = min(stop_ids)
    force_tokens(monkeypatch, {1: lead, 2: stop})
    client = server.client()
    kw = dict(model="tiny", prompt=TEXT, max_tokens=6, temperature=0, logprobs=1)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
        text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, reason, offsets = choice.text, choice.finish_reason, choice.logprobs.text_offset
    assert reason == "stop" and text.endswith("\ufffd") and len(offsets) == 3
    assert offsets[1] == len(text) - 1 and offsets[2] == len(text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_left_out_token_after_a_character_left_unfinished_stands_after_its_u_fffd(server, local, stop_ids,
                                                                                     monkeypatch, stream):  # fmt: skip
    """A character's first byte, a special token, then a token that begins a new character: the text
    shows the first byte as U+FFFD, and the special token (no text of its own) comes after it."""
    special = local.special
    banned = {special.img_start, special.img_end, special.img_context, special.im_start}
    quiet = min(set(local.tokenizer.special_ids) - stop_ids - banned)
    lead = next(i for i in range(100_000) if local.tokenizer.token_bytes(i) == b"\xc3")
    plain = local.tokenizer.encode("x")[0]  # a token of its own ASCII text
    force_tokens(monkeypatch, {1: lead, 2: quiet, 3: plain})
    client = server.client()
    kw = dict(model="tiny", prompt=TEXT, max_tokens=4, temperature=0, logprobs=1)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
        text = "".join(c.text for c in chunks)
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, offsets = choice.text, choice.logprobs.text_offset
    fffd = text.index("\ufffd")
    assert text[fffd + 1 :] == local.tokenizer.decode([plain]) and offsets[1:] == [fffd, fffd + 1, fffd + 1]


def test_a_left_out_stop_token_after_an_unfinished_character_stands_after_its_u_fffd():
    entries = _entries(b"a", b"\xc3", b"<|im_end|>")
    entries[2] = Entry(entries[2], left_out=True, ends=True)
    assert LegacyLogprobs().shape(entries)["text_offset"] == [0, 1, 2]  # "a\ufffd"
    entries = _entries(b"a", b"\xc3", b"<|im_end|>", b"b")
    entries[2] = Entry(entries[2], left_out=True)
    assert LegacyLogprobs().shape(entries)["text_offset"] == [0, 1, 2, 2]  # "a\ufffdb"


def test_a_stream_sends_text_completion_chunks_that_add_up_to_the_answer(client):
    kw = dict(model="tiny", prompt=[TEXT, "Red, green and"], max_tokens=6, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.usage is None
        [choice] = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            reasons[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=WAIT_S) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def test_an_engine_failure_before_the_job_starts_is_the_same_status_and_body_streamed_or_not(server, monkeypatch):
    """A stream's status line waits for the engine's start of its job: a failure before it (here
    in choosing the job's slot) was a 200 and an error event, where the same request without
    `stream` is an error status."""
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 3, "temperature": 0}
    answers = []
    for stream in (False, True):
        fail_once(monkeypatch, server.worker.slots, "choose", RuntimeError("no slot for you"))
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": stream}, timeout=WAIT_S) as r:
            answers.append((r.status_code, r.headers["content-type"], r.read()))
        monkeypatch.undo()
    (status, kind, plain), streamed = answers
    assert status == 500 and kind.startswith("application/json") and answers[1] == answers[0], answers
    assert json.loads(plain)["error"]["message"] == "internal error (RuntimeError: no slot for you)"
    response = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=WAIT_S)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")  # the next one streams


def streamed_and_not(server, body: dict) -> list[tuple[int, str, bytes]]:
    """(status, content type, body) of `body` sent without `stream`, then with it."""
    answers = []
    for stream in (False, True):
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": stream}, timeout=WAIT_S) as r:
            answers.append((r.status_code, r.headers["content-type"], r.read()))
    return answers


@pytest.mark.parametrize("second, max_tokens", [
    ("word " * 5000, 2),  # the second prompt alone is over the context
    ([1, 10**9], 2),  # its token id is outside the vocabulary
    ("word " * 2000, 2000),  # it fits, but not with max_tokens
])  # fmt: skip
def test_a_later_prompt_refused_is_the_same_status_and_body_streamed_or_not(server, second, max_tokens):
    body = {"model": "tiny", "prompt": [TEXT, second], "max_tokens": max_tokens, "temperature": 0}
    plain, streamed = streamed_and_not(server, body)
    assert plain[0] == 400 and plain[1].startswith("application/json") and streamed == plain, (plain, streamed)


def test_the_engine_refuses_a_later_prompt_before_the_stream_begins(server, monkeypatch):
    """The engine's own checks of a prompt (the Session's: context, sampling settings) run for every
    prompt before its "started" event: a refusal of the second one was a 200 stream holding the first
    prompt's answer and an error event, where without `stream` it is a 400."""
    from internvl_chat.chat.session import Session
    from internvl_chat.errors import ContextOverflowError

    second = TEXT + " and once more"
    refused_ids = server.loaded.tokenizer.encode(second)
    real = Session.check_continuation

    def refuses_the_second(session, ids, reuse, params):
        if list(ids) == refused_ids:
            raise ContextOverflowError("this prompt cannot fit (the engine says so)")
        return real(session, ids, reuse, params)

    monkeypatch.setattr(Session, "check_continuation", refuses_the_second)
    body = {"model": "tiny", "prompt": [TEXT, second], "max_tokens": 3, "temperature": 0, "n": 2}
    answered = sum(server.worker.counts.values())
    plain, streamed = streamed_and_not(server, body)
    assert plain[0] == 400 and streamed == plain, (plain, streamed)
    error = json.loads(plain[2])["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt.1")
    assert sum(server.worker.counts.values()) == answered  # not even the first prompt was answered


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": ["fine", [1, "two"]]}, "prompt.1"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt.1"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt"),
    ({"prompt": ["x", "y"], "n": MAX_PROMPTS}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "suffix": "after"}, "suffix"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "word " * 5000}, "prompt"),
])  # fmt: skip
def test_bad_requests_get_one_line_openai_errors_naming_the_field(server, body, param):
    response = post(server, {"model": "tiny", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"]


def test_an_unknown_model_and_a_missing_key_are_refused_as_chat_refuses_them(server, tiny_original):
    assert post(server, {"model": "other", "prompt": "x"}).status_code == 404
    from serve_support import RunningServer

    with RunningServer(tiny_original, api_key="sekrit") as keyed:
        with pytest.raises(openai.AuthenticationError):
            keyed.client().completions.create(model="tiny", prompt="x", max_tokens=1)
        assert keyed.client("sekrit").completions.create(model="tiny", prompt="x", max_tokens=1).choices


def _entries(*pieces: bytes) -> list[dict]:
    return [{"token": p.decode("utf-8", "replace"), "logprob": -1.0, "bytes": list(p), "top_logprobs": []} for p in pieces]


@pytest.mark.parametrize("pieces, text, offsets", [
    ((b"a", b"\xc3", b"\xa9", b"b"), "a\u00e9b", [0, 1, 1, 2]),  # é in two tokens: both begin where it does
    ((b"a", b"\xc3", b"v"), "a\ufffdv", [0, 1, 2]),  # a character begun and not continued: one U+FFFD
    ((b"\xe2\x82", b"\xac!", b"ok"), "\u20ac!ok", [0, 0, 2]),
])  # fmt: skip
def test_text_offsets_count_the_characters_of_the_text_before_each_token(pieces, text, offsets):
    legacy = LegacyLogprobs()
    shaped = legacy.shape(_entries(*pieces))
    assert shaped["text_offset"] == offsets
    assert b"".join(pieces).decode("utf-8", "replace") == text  # the text those tokens spell
    legacy.restart_at(len(text) + 5)  # an echoed prompt's text before the answer
    assert legacy.shape(_entries(b"x"))["text_offset"] == [len(text) + 5]


def test_a_left_out_token_between_a_character_s_bytes_leaves_the_character_whole():
    """An answer's text skips the special token (b"\\xc3", <|im_end|>, b"\\xa9" reads "é"); an echoed
    prompt's text holds it (and so the U+FFFD of each byte alone)."""
    entries = _entries(b"a", b"\xc3", b"<|im_end|>", b"\xa9", b"b")
    entries[2] = Entry(entries[2], left_out=True)
    assert LegacyLogprobs().shape(entries)["text_offset"] == [0, 1, 1, 1, 2]  # "aéb"
    assert LegacyLogprobs().shape(entries, prompt=True)["text_offset"] == [0, 1, 2, 12, 13]  # "a\ufffd<|im_end|>\ufffdb"


# ---- echo and the prompt's log-probabilities -----------------------------------------------------


def test_echo_puts_the_prompt_before_the_answer(client):
    plain = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == TEXT + plain.choices[0].text
    alone = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True)
    assert (alone.choices[0].text, alone.choices[0].finish_reason, alone.usage.completion_tokens) == (TEXT, "length", 0)


def test_prompt_logprobs_match_a_full_forward(server, client, local, monkeypatch):
    # small prefill chunks and score blocks: the prompt spans several of each, and ends inside one
    monkeypatch.setattr(server.worker.model, "prefill_chunk", 16)
    monkeypatch.setattr(engine_model, "SCORE_ROWS", 5)
    ids = local.tokenizer.encode(LONG_TEXT)
    assert len(ids) > 40
    answer = client.completions.create(model="tiny", prompt=LONG_TEXT, max_tokens=0, echo=True, logprobs=3)
    logprobs = answer.choices[0].logprobs
    reference = full_logprobs(local, ids)
    assert answer.choices[0].text == LONG_TEXT and "".join(logprobs.tokens) == LONG_TEXT
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) == len(ids)
    for j in range(1, len(ids)):
        row = reference[j - 1]
        assert logprobs.token_logprobs[j] == pytest.approx(float(row[ids[j]]), abs=1e-4)
        assert_top(logprobs.top_logprobs[j], row, 3, logprobs.token_logprobs[j])
    assert_offsets(logprobs, LONG_TEXT)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:k])) for k in range(len(ids))]  # whole characters


def test_only_echo_with_logprobs_takes_the_scored_prefill_and_it_keeps_no_unscored_prefix(server, client, monkeypatch):
    model, scored = server.worker.model, []
    real = model._scored_prefill
    monkeypatch.setattr(model, "_scored_prefill", lambda *a, **k: scored.append(a) or real(*a, **k))
    kw = dict(model="tiny", prompt=OTHER_TEXT, max_tokens=2, temperature=0)
    client.completions.create(**kw)
    again = client.completions.create(**kw, echo=True)  # the same prompt: its prefix comes from a slot
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TEXT}], max_tokens=2, logprobs=True)
    assert scored == []  # the plain prefill, logprobs of the answer or not
    with_logprobs = client.completions.create(**kw, echo=True, logprobs=1)
    assert len(scored) == 1 and with_logprobs.usage.prompt_tokens_details.cached_tokens == 0  # cached, but not scored
    scored_again = client.completions.create(**kw, echo=True, logprobs=1)
    assert scored_again.usage.prompt_tokens_details.cached_tokens == scored_again.usage.prompt_tokens - 1
    prompt_n = scored_again.usage.prompt_tokens  # the prompt's entries come back as they were kept
    first, second = with_logprobs.choices[0].logprobs, scored_again.choices[0].logprobs
    assert second.token_logprobs[:prompt_n] == first.token_logprobs[:prompt_n]
    assert second.top_logprobs[:prompt_n] == first.top_logprobs[:prompt_n]


def test_echo_with_logprobs_and_an_answer_lists_the_prompt_then_the_answer(client, local, stop_ids):
    ids = local.tokenizer.encode(TEXT)
    answer = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    generated, _ = greedy(local, ids, 3, stop_ids)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + len(generated)
    assert answer.choices[0].text == TEXT + local.tokenizer.decode(generated)
    assert logprobs.text_offset[len(ids)] == len(TEXT)
    reference = full_logprobs(local, ids + generated)
    values = [float(reference[j - 1][t]) for j, t in enumerate(ids + generated) if j]
    assert logprobs.token_logprobs[1:] == pytest.approx(values, abs=1e-4)


def test_a_streamed_echo_comes_first_with_its_logprobs(client):
    whole = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    chunks = list(client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))  # fmt: skip
    assert chunks[0].choices[0].text == TEXT
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.choices[0].logprobs.tokens and offsets == whole.choices[0].logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


# ---- lm-evaluation-harness local-completions ------------------------------------------------------
# Its request bodies (lm_eval/models/openai_completions.py, LocalCompletionsAPI._create_payload)
# and how it reads the answers (parse_logprobs, parse_generations), replayed as sent.


def lm_eval_loglikelihood(server, contexts_and_continuations: list[tuple[list[int], list[int]]], max_tokens: int = 1):
    """lm-eval's loglikelihood: a batch of token-id prompts (context + continuation), the sum of the
    continuation's logprobs and whether each of its tokens was the most likely one."""
    body = {"model": "tiny", "prompt": [c + x for c, x in contexts_and_continuations], "temperature": 0,
            "max_tokens": max_tokens, "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    response = post(server, body)
    assert response.status_code == 200, response.text
    out, results = response.json(), []
    end = -1 if max_tokens else None  # max_tokens 1: the last listed token is the one generated
    for choice, (context, _) in zip(sorted(out["choices"], key=itemgetter("index")), contexts_and_continuations):
        values = choice["logprobs"]["token_logprobs"][len(context) : end]
        tops = choice["logprobs"]["top_logprobs"][len(context) : end]
        results.append((sum(values), all(v == max(top.values()) for v, top in zip(values, tops))))
    return results


def reference_loglikelihood(local, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    rows = full_logprobs(local, context + continuation)[len(context) - 1 : -1]
    picked = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(continuation)).all())


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_requests_read_back_the_continuations_logprobs(server, local, max_tokens):
    tok = local.tokenizer
    pairs = [(tok.encode("Question: what colour is the sky?\nAnswer:"), tok.encode(" blue")),
             (tok.encode("Question: what colour is the sky?\nAnswer:"), tok.encode(" bright green")),
             (tok.encode("The capital of France is"), tok.encode(" Paris, of course"))]  # fmt: skip
    # a continuation the model would pick greedily: is_greedy must come back true for it
    context = tok.encode(TEXT)
    greedy_ids = [int(full_logprobs(local, context)[-1].argmax())]
    greedy_ids.append(int(full_logprobs(local, context + greedy_ids)[-1].argmax()))
    pairs.append((context, greedy_ids))
    got = lm_eval_loglikelihood(server, pairs, max_tokens)
    for (value, is_greedy), (context, continuation) in zip(got, pairs):
        expected_value, expected_greedy = reference_loglikelihood(local, context, continuation)
        assert value == pytest.approx(expected_value, abs=1e-3)
        assert is_greedy == expected_greedy
    assert got[-1][1] is True


def test_lm_eval_loglikelihood_keeps_the_last_continuation_token_when_the_answer_is_a_stop_token(server, local, stop_ids):
    # the one token generated is the stop token: it is listed, so lm-eval's [ctxlen:-1] drops it
    # and not the continuation's last token (vLLM lists it too)
    tok = local.tokenizer
    stop = sorted(stop_ids)[0]
    context = tok.encode(TEXT)
    continuation = tok.encode(" and")
    body = {"model": "tiny", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "echo": True, "seed": 1234}  # fmt: skip
    original = server.worker.slots.slots[0].session._make_sampler

    def forced_stop(params, _real=original):
        sampler = _real(params)
        real_next = sampler.next_token

        def next_token(logits):
            biased = logits.clone().reshape(-1)
            biased[stop] = 1e4  # the stop token is certain
            return real_next(biased)

        sampler.next_token = next_token
        return sampler

    for slot in server.worker.slots.slots:
        slot.session._make_sampler = forced_stop
    try:
        out = post(server, body).json()
    finally:
        for slot in server.worker.slots.slots:
            del slot.session._make_sampler
    [choice] = out["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == tok.decode(context + continuation)
    values = choice["logprobs"]["token_logprobs"]
    assert len(values) == len(context) + len(continuation) + 1
    expected, _ = reference_loglikelihood(local, context, continuation)
    assert sum(values[len(context) : -1]) == pytest.approx(expected, abs=1e-3)


def test_lm_eval_generate_until_reads_each_choices_text(server, local, stop_ids):
    tok = local.tokenizer
    prompts = [TEXT, "Red, green and"]
    body = {"prompt": prompts, "model": "tiny", "max_tokens": 10, "temperature": 0, "stop": ["\n\n", "Question:"],
            "seed": 1234}  # fmt: skip
    out = post(server, body).json()
    texts = [None] * len(out["choices"])
    for choice in out["choices"]:
        texts[choice["index"]] = choice["text"]
    for text, prompt in zip(texts, prompts):
        expected = tok.decode(greedy(local, tok.encode(prompt), 10, stop_ids)[0])
        for stop in body["stop"]:
            expected = expected.split(stop)[0]
        assert text == expected


def test_lm_eval_text_requests_read_a_special_tokens_text_as_that_token(server, local):
    # lm-eval's tokenized_requests=False decodes its ids to text, a rolling loglikelihood's prefix
    # token ("<|im_end|>": the tokenizer has no bos) included, and reads the logprobs back by its own
    # count (ctxlen 1): the text must encode back to those ids, as vLLM's does
    tok, prefix = local.tokenizer, local.special.im_end
    continuation = tok.encode(" the lazy dog")
    sent = tok.decode([prefix]) + " the lazy dog"
    body = {"model": "tiny", "prompt": [sent], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234}  # fmt: skip
    out = post(server, body).json()
    assert out["usage"]["prompt_tokens"] == 1 + len(continuation)
    [choice] = out["choices"]
    expected, _ = reference_loglikelihood(local, [prefix], continuation)
    assert sum(choice["logprobs"]["token_logprobs"][1:-1]) == pytest.approx(expected, abs=1e-3)
    assert choice["text"].startswith(sent)  # the echo is the text sent
    assert choice["logprobs"]["text_offset"][:2] == [0, len(tok.decode([prefix]))]


# ---- admission and cancellation: chat's, shared ---------------------------------------------------


def test_a_page_of_an_origin_not_allowed_cannot_post_a_completion_without_a_preflight(server):
    before = server.worker.counts.copy()
    response = httpx.post(f"{server.url}/v1/completions", content=json.dumps({"model": "tiny", "prompt": "x"}),
                          headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}, timeout=WAIT_S)  # fmt: skip
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    assert server.worker.counts == before  # nothing ran


def test_a_full_queue_refuses_a_completion_with_429(server):
    worker, started, release = server.worker, threading.Event(), threading.Event()

    def hold(job):
        started.set()
        assert release.wait(WAIT_S)

    worker.on_start = hold
    server.options.queue_depth = 0
    try:
        busy = threading.Thread(target=post, args=(server, {"model": "tiny", "prompt": "x", "max_tokens": 1}))
        busy.start()
        assert started.wait(WAIT_S)
        refused = post(server, {"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429 and refused.headers["Retry-After"]
    finally:
        server.options.queue_depth = 8
        worker.on_start = None
        release.set()
    busy.join(WAIT_S)


def test_a_client_that_leaves_stops_its_prompts_and_later_ones_never_begin(server):
    worker, first, closed, seen = server.worker, threading.Event(), threading.Event(), {}

    def watch(job, event):
        if first.is_set():
            return
        seen["job"] = job
        first.set()
        assert closed.wait(WAIT_S)
        assert job.cancel.wait(WAIT_S)  # the handler sees the client gone and cancels the job

    worker.on_event = watch
    body = json.dumps({"model": "tiny", "prompt": [TEXT, TEXT + " again", TEXT + " once more"], "max_tokens": 200,
                       "temperature": 0, "stream": True}).encode()  # fmt: skip
    head = ("POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
        sock.sendall(head + body)
        assert first.wait(WAIT_S)
        sock.close()
        closed.set()
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    records = [r for r in worker.finished if r["job"] == seen["job"].number]
    assert [r["finish_reason"] for r in records] == ["cancelled"]  # the first prompt's answer, and no other


# ---- review: the edges of the prompt and the fields ----------------------------------------------


def test_a_prompt_near_the_context_end_gets_what_room_is_left_without_max_tokens(server, local):
    """max_tokens unsent: OpenAI's 16 at most, fewer where the context has less room (as vLLM);
    a 400 naming a max_tokens the client never sent would refuse lm-eval's long prompts."""
    ids = (local.tokenizer.encode(LONG_TEXT) * 200)[: server.worker.model.max_seq_len - 5]
    response = post(server, {"model": "tiny", "prompt": ids, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 5


def test_without_max_tokens_each_prompt_of_a_list_gets_the_room_its_own_length_leaves(server, local):
    """vLLM's default, prompt by prompt: a short prompt sent with one near the context end was cut
    to the few tokens the long one has room for."""
    near_end = (local.tokenizer.encode(LONG_TEXT) * 200)[: server.worker.model.max_seq_len - 3]
    alone = post(server, {"model": "tiny", "prompt": TEXT, "temperature": 0}).json()
    listed = post(server, {"model": "tiny", "prompt": [TEXT, near_end], "temperature": 0}).json()
    short, alone_choice = listed["choices"][0], alone["choices"][0]
    assert (short["text"], short["finish_reason"]) == (alone_choice["text"], alone_choice["finish_reason"])
    assert listed["usage"]["completion_tokens"] <= alone["usage"]["completion_tokens"] + 3  # the long one: 3 at most


def test_a_tokenizer_failure_on_a_text_prompt_is_a_one_line_400_not_a_500(server, monkeypatch):
    from internvl_chat.engine.tokenizer import TokenizerPanic

    def panics(text):
        raise TokenizerPanic("the checkpoint's tokenizer.json failed on this text (regex too big)")

    monkeypatch.setattr(server.worker.prompts.tokenizer, "encode", panics)
    response = post(server, {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert "tokenizer.json failed" in response.json()["error"]["message"]
