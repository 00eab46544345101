"""OpenAI `logprobs` / `top_logprobs`: values, grouping with the streamed text, stop strings, refusals.

The served values are checked against a direct forward of the same tiny checkpoint (a second copy,
float32 on the CPU); the grouping of tokens with their text is checked on the real generator with
a scripted model whose answer splits characters across byte-level tokens.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import openai
import pytest
import torch
import tokenizers

from qwen_like_tokenizer import build_qwen_like_tokenizer
from internvl_chat.chat.generate import stream_generate
from internvl_chat.chat.sampling import Sampler, SamplingParams
from internvl_chat.engine.loader import load_model
from internvl_chat.engine.tokenizer import BYTE_ALPHABET, as_tokenizer
from internvl_chat.serve import engine
from internvl_chat.serve.errors import APIError
from internvl_chat.serve.logprobs import SentTokens, TokenPieces, entries_bytes, held_bytes, position_bytes
from internvl_chat.serve.stops import StopStrings
from serve_support import chat_body

QUESTION = "Tell me about colours."
WAIT_S = 120


@pytest.fixture(scope="module")
def local(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096)


def ask(client, text=QUESTION, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def reference_logprobs(local, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log_softmax of the logits that predict each answer token, from one forward of the whole text."""
    with torch.inference_mode():
        logits = local.model.forward(prompt + answer, 0, all_logits=True)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)].float().log_softmax(-1)


@pytest.fixture(scope="module")
def specials(local) -> set[str]:
    """The special tokens' texts: listed, but left out of the answer's text."""
    return {local.tokenizer.decode([i]) for i in local.tokenizer.special_ids}


def listed_text(entries, specials: set[str]) -> str:
    """What the listed tokens spell in the answer."""
    raw = b"".join(bytes(e.bytes) for e in entries if e.token not in specials)
    return raw.decode("utf-8", "replace")


# ---- values ----------------------------------------------------------------------------------


def test_greedy_logprobs_are_the_models_log_softmax(client, builder, local, specials):
    out = ask(client, logprobs=True, top_logprobs=5, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content  # the openai client parsed it: ChatCompletionTokenLogprob objects
    assert len(content) == len(ids) == out.usage.completion_tokens and ids
    want = reference_logprobs(local, builder.first_turn(QUESTION), ids)
    pieces = TokenPieces(local.tokenizer)
    for k, (entry, token_id) in enumerate(zip(content, ids)):
        assert entry.logprob == pytest.approx(float(want[k, token_id]), abs=1e-4)
        assert (entry.token, entry.bytes) == pieces.piece(token_id)
        top = entry.top_logprobs
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert [t.logprob for t in top] == pytest.approx(torch.topk(want[k], 5).values.tolist(), abs=1e-4)
        assert (top[0].token, top[0].bytes) == (entry.token, entry.bytes)  # greedy: the chosen one is the most likely
        assert top[0].logprob == entry.logprob
    assert listed_text(content, specials) == choice.message.content


def test_sampled_logprobs_are_before_temperature_and_filters(client, builder, local):
    out = ask(client, logprobs=True, top_logprobs=2, temperature=1.8, top_p=0.7, seed=11,
              extra_body={"return_token_ids": True, "top_k": 3, "repetition_penalty": 1.3})  # fmt: skip
    ids = out.choices[0].model_extra["token_ids"]
    want = reference_logprobs(local, builder.first_turn(QUESTION), ids)
    got = [e.logprob for e in out.choices[0].logprobs.content]
    assert got == pytest.approx([float(want[k, t]) for k, t in enumerate(ids)], abs=1e-4)


def test_logprobs_without_top_logprobs_list_no_alternatives(client):
    choice = ask(client, logprobs=True).choices[0]
    assert choice.logprobs.content and all(e.top_logprobs == [] for e in choice.logprobs.content)
    assert choice.logprobs.refusal is None


def test_without_logprobs_the_answer_has_none(server):
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(QUESTION, max_tokens=4), timeout=60).json()
    assert raw["choices"][0]["logprobs"] is None


# ---- streaming ---------------------------------------------------------------------------------


def stream_chunks(client, **kw):
    return [c for c in ask(client, stream=True, **kw) if c.choices]


def test_streaming_gives_the_same_logprobs_each_with_its_text(client, specials):
    whole = ask(client, logprobs=True, top_logprobs=3, max_tokens=16).choices[0]
    chunks = stream_chunks(client, logprobs=True, top_logprobs=3, max_tokens=16)
    text, listed = "", []
    for c in chunks:
        choice = c.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None  # every chunk that carries text carries its tokens' list
        if choice.logprobs is not None:
            listed += choice.logprobs.content
        text += choice.delta.content or ""
        assert text.startswith(listed_text(listed, specials))  # a token comes with (or after) the text it completes
    assert text == whole.message.content == listed_text(listed, specials)
    assert [e.model_dump() for e in listed] == [e.model_dump() for e in whole.logprobs.content]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_keeps_no_list_of_the_entries_it_has_sent(server, monkeypatch, path):
    """A stream sends each token's entry with its text; the engine also kept every entry of the
    answer, for the non-streamed answer's list, until the answer's end (a 32k-token answer with
    top_logprobs 20: ~190 MB held, whatever bound there is on what may wait unsent). A streamed
    job's "choice" events now carry none; a non-streamed one's still carry them all."""
    from internvl_chat.serve import engine

    kept: list[int] = []  # each "choice" event's entries, in the order of the requests (one at a time)
    emit = engine.Job.emit

    def recording(job, kind, payload):
        if kind == "choice":
            kept.append(len(payload["logprobs"] or ()))
        return emit(job, kind, payload)

    monkeypatch.setattr(engine.Job, "emit", recording)
    if path.endswith("chat/completions"):
        body = chat_body(QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    else:
        body = {"model": "tiny", "prompt": QUESTION, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    assert whole.status_code == 200 and lines
    assert len(kept) == 2 and kept[0] > 0  # the non-streamed answer's list
    assert kept[1] == 0, "the stream's job kept every entry it had sent"


# ---- stop strings ------------------------------------------------------------------------------


def ends(content, specials: set[str]) -> list[int]:
    """Where each listed token's text ends in the answer."""
    out, raw = [], b""
    for e in content:
        if e.token not in specials:
            raw += bytes(e.bytes)
        out.append(len(raw.decode("utf-8", "replace")))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_list_where_it_cuts_the_text(client, specials, stream):
    full = ask(client, logprobs=True, top_logprobs=1, max_tokens=16).choices[0]
    text, token_ends = full.message.content, ends(full.logprobs.content, specials)

    def first_there(cut: int) -> bool:  # a two-character stop string from `cut` that first appears there
        return cut + 2 <= len(text) and text.find(text[cut : cut + 2]) == cut

    # a stop string at a token's start, and one that begins inside a token of several characters
    boundary = next(e for e in token_ends[1:] if first_there(e))
    inside = next(e - 1 for k, e in enumerate(token_ends[1:], 1) if e - token_ends[k - 1] >= 2 and first_there(e - 1))
    for cut in (boundary, inside):
        stop = text[cut : cut + 2]
        want = [e.model_dump() for e, end in zip(full.logprobs.content, token_ends) if end <= cut]
        if stream:
            chunks = stream_chunks(client, logprobs=True, top_logprobs=1, max_tokens=16, stop=[stop])
            got = [e.model_dump() for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:cut]
        else:
            answer = ask(client, logprobs=True, top_logprobs=1, max_tokens=16, stop=[stop]).choices[0]
            got = [e.model_dump() for e in answer.logprobs.content]
            assert answer.message.content == text[:cut] and answer.finish_reason == "stop"
        assert got == want, (stop, cut)


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, says",
    [
        ({"logprobs": True, "top_logprobs": 21}, "from 0 to 20"),
        ({"logprobs": True, "top_logprobs": -1}, "from 0 to 20"),
        ({"top_logprobs": 2}, "needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 3}, "needs logprobs: true"),
    ],
)
def test_bad_top_logprobs_are_400_naming_it(client, change, says):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, **change)
    assert err.value.body["param"] == "top_logprobs"
    assert says in err.value.body["message"]


# ---- the memory a non-streamed answer's logprobs may hold -------------------------------------

SMALL_BUDGET = 1 << 20  # 1 MiB: n 16 × 16 tokens × top_logprobs 20 (~2.4 MB) is over it, one answer of them is not


@pytest.fixture
def small_budget(server, monkeypatch):
    """The module's server with a logprobs budget of SMALL_BUDGET (put back after the test), and the
    jobs the engine starts meanwhile."""
    started = []
    # no job of an earlier test may still be queued or running: it would start under this hook (and
    # be counted as this test's), and one of this test's must not outlive the hook and the budget
    assert server.worker.wait_idle(WAIT_S)
    monkeypatch.setattr(server.options, "max_logprobs_bytes", SMALL_BUDGET)
    monkeypatch.setattr(server.worker, "on_start", started.append)
    yield started
    assert server.worker.wait_idle(WAIT_S)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_non_streamed_request_whose_logprobs_could_pass_the_budget_is_refused_before_it_runs(server, small_budget, path):
    """Every entry of a non-streamed answer is held until it is sent whole: n 16 × a 32k-token
    answer × top_logprobs 20 took ~5 GB. Its worst case is refused before the job is queued."""
    if path.endswith("chat/completions"):
        body = chat_body(QUESTION, max_tokens=16, n=16, logprobs=True, top_logprobs=20)
        names = ("max_tokens", "n", "top_logprobs", "stream: true")
    else:
        body = {"model": "tiny", "prompt": QUESTION, "max_tokens": 32, "n": 16, "temperature": 0, "logprobs": 5,
                "echo": True}  # fmt: skip
        names = ("max_tokens", "n", "logprobs", "stream: true")
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "logprobs_too_large", "logprobs")
    assert "MiB of server memory" in error["message"] and "allows 1 MiB" in error["message"]
    assert all(name in error["message"] for name in names), error["message"]
    assert small_budget == []  # never queued, never run
    # the same request streamed holds none of it: accepted and answered whole
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert len(small_budget) == 1


def test_requests_under_the_budget_and_without_logprobs_are_answered(client, small_budget):
    one = ask(client, max_tokens=16, logprobs=True, top_logprobs=20)  # one answer of them: ~150 KB
    assert one.choices[0].logprobs.content
    many = ask(client, max_tokens=16, n=16)  # no logprobs: nothing held for them
    assert len(many.choices) == 16
    assert len(small_budget) == 2


def test_typical_and_scoring_requests_pass_the_default_budget(server):
    """At the default budget (1 GiB): a chat answer with top_logprobs 20 and no max_tokens, and an
    lm-eval loglikelihood request (echo, logprobs 1, max_tokens 0) of a prompt that fills the context."""
    assert server.options.max_logprobs_bytes == 1 << 30
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(QUESTION, logprobs=True, top_logprobs=20),
                   timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["logprobs"]["content"]
    prompt = [100 + i % 200 for i in range(server.worker.model.max_seq_len - 1)]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == len(prompt)


def budget_job(prompt_len: int, max_new_tokens: int, n: int = 1, k: int | None = 20, **kw) -> engine.Job:
    from internvl_chat.serve.conversation import Prompt

    params = SamplingParams(max_new_tokens=max_new_tokens, logprobs=k)
    return engine.Job(Prompt(ids=[1] * prompt_len), params, [], None, choices=n, **kw)


@pytest.mark.parametrize(("job", "passes"), [
    # n 1, top_logprobs 20, a 32k context's whole room: ~310 MB
    (lambda: budget_job(100, 32_668), True),
    # n 16 of them: ~4.9 GB
    (lambda: budget_job(100, 32_668, n=16), False),
    # streamed: nothing held
    (lambda: budget_job(100, 32_668, n=16, keep_entries=False), True),
    # no logprobs
    (lambda: budget_job(100, 32_668, n=16, k=None), True),
    # n 16 with max_tokens 1024: ~155 MB
    (lambda: budget_job(100, 1024, n=16), True),
    # lm-eval's scoring of a 32k-token prompt: echo, logprobs 1, max_tokens 0 (~32 MB)
    (lambda: budget_job(32_767, 1, k=1, echo=True, prompt_logprobs=1, discard_answer=True, prompt_field="prompt"), True),
    # 64 such prompts with logprobs 5, each echoed: ~5.8 GB
    (lambda: budget_job(32_767, 1, n=64, k=5, echo=True, prompt_logprobs=5, discard_answer=True, prompt_field="prompt"), False),
])  # fmt: skip
def test_the_default_budget_refuses_the_worst_cases_alone(job, passes):
    from internvl_chat.serve.options import ServeOptions

    worker = engine.EngineWorker.__new__(engine.EngineWorker)  # check_logprobs reads the options alone
    worker.options = ServeOptions()
    if passes:
        worker.check_logprobs(job())
    else:
        with pytest.raises(APIError) as err:
            worker.check_logprobs(job())
        assert err.value.status == 400 and "GiB of server memory" in err.value.message


@pytest.mark.parametrize(("budget", "over"), [(1 << 30, 200), (1 << 20, 40), (1500 << 20, 1)])
def test_a_refusal_just_over_the_budget_shows_more_than_the_budget(budget, over):
    """A request a little over the budget was told it "could take about 1 GiB of server memory …;
    this server allows 1 GiB": the two sizes read the same. The estimate must read as more."""
    import re

    from internvl_chat.serve.options import ServeOptions

    worker = engine.EngineWorker.__new__(engine.EngineWorker)
    worker.options = ServeOptions(max_logprobs_bytes=budget)
    tokens = budget // held_bytes(20) + over
    with pytest.raises(APIError) as err:
        worker.check_logprobs(budget_job(10, tokens))
    message = err.value.message
    needed = re.search(r"could take about ([\d,.]+) (MiB|GiB)", message).groups()
    allowed = re.search(r"this server allows ([\d,.]+) (MiB|GiB)", message).groups()
    assert needed != allowed, message
    if needed[1] == allowed[1]:
        assert float(needed[0].replace(",", "")) > float(allowed[0].replace(",", "")), message


def test_the_budget_is_a_serve_flag_and_setting_in_mib():
    import os

    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.serve.options import ServeOptions
    from internvl_chat.settings import load_settings

    def budget(argv: list[str], env: dict | None = None) -> int | None:
        settings = load_settings(os.devnull, env or {}, _overrides(build_parser().parse_args(argv)))
        return ServeOptions.from_settings(settings).max_logprobs_bytes

    assert budget([]) == ServeOptions().max_logprobs_bytes == 1 << 30
    assert budget(["--max-logprobs-mb", "64"]) == 64 << 20
    assert budget(["--max-logprobs-mb", "0"]) is None  # no limit
    assert budget([], {"INTERNVL_CHAT_SERVE_MAX_LOGPROBS_MB": "7"}) == 7 << 20


def test_the_estimate_of_an_entry_is_what_entries_bytes_counts():
    entry = {"token": "defg", "logprob": -1.2345678901234567, "bytes": [100, 101, 102, 103],
             "top_logprobs": [{"token": "wxyz", "logprob": -1.2345678901234567, "bytes": [119, 120, 121, 122]}] * 20}  # fmt: skip
    assert position_bytes(20) == entries_bytes([entry])
    assert position_bytes(0) == entries_bytes([{**entry, "top_logprobs": []}])
    # at the answer's end its JSON is held too, as text and then as bytes
    assert held_bytes(20) == position_bytes(20) + 2 * (len(json.dumps(entry, separators=(",", ":"))) + 1)


# ---- token text and bytes ----------------------------------------------------------------------


def test_the_byte_alphabet_is_the_byte_level_vocabularys():
    assert set(BYTE_ALPHABET) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_ALPHABET.values()) == list(range(256))
    assert BYTE_ALPHABET["Ġ"] == 32 and BYTE_ALPHABET["A"] == 65


ANSWER = "Naïve café 你好，世界！猫🐱 and 🦊 — 42."


@pytest.fixture(scope="module")
def splitting_tokenizer() -> Any:
    """A Qwen-like tokenizer that never saw most of ANSWER's characters: they split across byte tokens."""
    return build_qwen_like_tokenizer(["Hello world, this is a picture of a cat. The answer is 42."] * 3, 300,
                                     pad_token="<|endoftext|>")  # fmt: skip


def test_a_token_holding_part_of_a_character_has_its_real_bytes(splitting_tokenizer):
    pieces = TokenPieces(splitting_tokenizer)
    ids = as_tokenizer(splitting_tokenizer).encode(ANSWER)
    partial = [pieces.piece(i) for i in ids if "\ufffd" in pieces.piece(i)[0]]
    assert partial  # otherwise the test proves nothing
    assert b"".join(bytes(pieces.piece(i)[1]) for i in ids).decode("utf-8") == ANSWER
    assert all(text == bytes(raw).decode("utf-8", "replace") for text, raw in partial)
    special = splitting_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert pieces.piece(special) == ("<|endoftext|>", list(b"<|endoftext|>"))



@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("banned_logit", [math.nan, math.inf])
def test_a_non_finite_logit_of_a_banned_token_still_gives_json(splitting_tokenizer, temperature, banned_logit):
    """An image token can never be answered (it is banned before the pick), so a NaN or +inf logit of its
    own does not stop the answer; the log-probabilities, taken before the ban, come out NaN then, and
    JSON has none (an answer was a 500, a stream a `NaN` its clients cannot parse)."""
    vocab = len(splitting_tokenizer)
    image = splitting_tokenizer.convert_tokens_to_ids("<img>")
    params = SamplingParams(temperature=temperature, top_k=1, logprobs=3)
    sampler = Sampler(params, vocab, "cpu", banned_ids=(image,))
    logits = torch.zeros(vocab)
    logits[5], logits[image] = 3.0, banned_logit
    assert sampler.read(sampler.next_token(logits)) == 5
    entry = TokenPieces(splitting_tokenizer).content(sampler.last_logprob)
    json.dumps(entry, allow_nan=False)
    assert all(-9999.0 <= e["logprob"] <= 0 for e in [entry, *entry["top_logprobs"]])

class ScriptedModel:
    """Logits that make a greedy decode spell `ids` and then stop."""

    device = torch.device("cpu")
    max_seq_len = 1 << 16

    def __init__(self, ids: list[int], vocab: int, stop: int):
        self.vocab = vocab
        self.queue = [*ids, stop]
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, ids, start_pos, image_features=None, cancel=None, scores=None):
        logits = torch.randn(self.vocab, generator=self.noise)
        if self.queue:
            logits[self.queue.pop(0)] = 20.0
        return logits


def scripted_events(tokenizer, stream_interval: int) -> list[dict]:
    ids = as_tokenizer(tokenizer).encode(ANSWER)
    stop = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab = len(tokenizer)
    params = SamplingParams(max_new_tokens=len(ids) + 1, logprobs=2)
    model = ScriptedModel(ids, vocab, stop)
    events = list(stream_generate(model, tokenizer, [1, 2], 0, params, Sampler(params, vocab, "cpu"), stop_ids=[stop],
                                  stream_interval=stream_interval))  # fmt: skip
    assert [e.token_id for ev in events for e, _ in ev["logprobs"]] == ids
    return events


@pytest.mark.parametrize("stream_interval", [1, 3])
def test_each_event_lists_the_tokens_whose_text_it_completes(splitting_tokenizer, stream_interval):
    pieces = TokenPieces(splitting_tokenizer)
    sent, raw = "", b""
    for event in scripted_events(splitting_tokenizer, stream_interval):
        listed = event["logprobs"]
        for k, (token, end) in enumerate(listed):
            raw += bytes(pieces.piece(token.token_id)[1])
            if k + 1 == len(listed) or listed[k + 1][1] != end:  # the tokens that spell a character end together
                # no token ends before its character does: their text ends exactly where the event says
                assert sent + event["text"][:end] == raw.decode("utf-8")
        sent += event["text"]
    assert sent == raw.decode("utf-8") == ANSWER


@pytest.mark.parametrize("stop", ["é", "你好", "猫🐱", "🦊", "fé", " 42", "nothing like it"])
def test_stop_strings_list_exactly_the_tokens_whose_text_was_sent(splitting_tokenizer, stop):
    pieces = TokenPieces(splitting_tokenizer)
    stops, tokens, sent, listed = StopStrings([stop]), SentTokens(pieces), "", []
    for event in scripted_events(splitting_tokenizer, 1):  # as serve/engine.py drives them
        tokens.receive(event)
        text = stops.push(event["text"]) + (stops.flush() if event["finish_reason"] else "")
        sent += text
        listed += tokens.sent(text)
    assert listed == tokens.listed
    assert sent == ANSWER.split(stop)[0]
    spelled = b"".join(bytes(e["bytes"]) for e in listed)
    assert sent.startswith(spelled.decode("utf-8"))  # all of each listed token's text was sent
    ids = as_tokenizer(splitting_tokenizer).encode(ANSWER)
    if len(listed) < len(ids):  # the first token left out: some of its text was not sent
        with_next = spelled + bytes(pieces.piece(ids[len(listed)])[1])
        assert not sent.startswith(with_next.decode("utf-8", "replace"))
