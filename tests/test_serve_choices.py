"""OpenAI's `n`: several answers to one request, the prompt prefilled once, each choice its own.

Shapes are read back with the official `openai` client; the prefill is counted by the engine's
own records (`worker.finished`: each choice's prefilled and cached tokens) and by counting the
vision encoder's and the multi-token forward passes, never by timing.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import types

import openai
import pytest

from internvl_chat.serve import replies
from internvl_chat.serve.engine import choice_seed
from internvl_chat.serve.protocol import MAX_CHOICES
from internvl_chat.settings import SEED_MAX
from media_helpers import textured_rgb
from serve_support import png_bytes

QUESTION = "Tell me a story about a cat."
WAIT_S = 60


def ask(client, text=QUESTION, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def sampled(client, **kw):
    return ask(client, temperature=1.5, seed=7, extra_body={"return_token_ids": True}, **kw)


def texts(out) -> list[str]:
    return [c.message.content for c in out.choices]


def records(worker, job_number: int) -> list[dict]:
    return [r for r in worker.finished if r["job"] == job_number]


# ---- answers ---------------------------------------------------------------------------------------


def test_n_answers_each_with_its_index_and_usage_summed(client):
    one = sampled(client)
    out = sampled(client, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in out.choices)
    counts = [len(c.model_extra["token_ids"]) for c in out.choices]
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert out.usage.completion_tokens == sum(counts) and all(counts)
    assert out.usage.total_tokens == out.usage.prompt_tokens + sum(counts)
    # the timings sum over the choices too (each choice's first token counts as its prompt's)
    assert out.model_extra["timings"]["predicted_n"] >= out.usage.completion_tokens - 3
    assert texts(out)[0] == one.choices[0].message.content  # choice 0 samples with the seed itself


def test_seeded_choices_are_reproducible_and_differ_from_each_other(client):
    first, again = sampled(client, n=4), sampled(client, n=4)
    assert texts(first) == texts(again)
    ids = [tuple(c.model_extra["token_ids"]) for c in first.choices]
    assert len(set(ids)) == 4  # each choice has a random stream of its own
    other_seed = ask(client, temperature=1.5, seed=8, n=4)
    assert texts(other_seed) != texts(first)


def test_greedy_choices_are_all_the_greedy_answer(client):
    one = ask(client).choices[0].message.content
    assert texts(ask(client, n=3)) == [one] * 3


def test_choice_seeds_are_distinct_in_range_and_keep_the_seed_for_choice_0():
    for seed in (0, 7, SEED_MAX):
        seeds = [choice_seed(seed, i) for i in range(MAX_CHOICES)]
        assert seeds[0] == seed and len(set(seeds)) == MAX_CHOICES
        assert all(0 <= s <= SEED_MAX for s in seeds)
    assert choice_seed(None, 3) is None  # no seed: each choice draws a random one


def test_best_of_equal_to_n_is_accepted(client):
    out = ask(client, n=2, extra_body={"best_of": 2})
    assert len(out.choices) == 2


@pytest.mark.parametrize("n, says", [(0, "at least 1"), (-2, "at least 1"), (MAX_CHOICES + 1, "more requests")])
def test_n_out_of_range_is_a_400_naming_n(client, n, says):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, n=n)
    assert err.value.body["param"] == "n" and says in err.value.body["message"]
    assert f"{MAX_CHOICES}" in err.value.body["message"] or n < 1


def test_n_at_the_limit_is_served(client):
    assert len(ask(client, n=MAX_CHOICES, max_tokens=1).choices) == MAX_CHOICES


# ---- one prefill ------------------------------------------------------------------------------------


def test_the_prompt_and_its_picture_are_prefilled_once_for_all_choices(server, client, monkeypatch):
    worker, model = server.worker, server.worker.model
    lm = model.language_model
    encode, forward_embeds = model.encode_images, lm.forward_embeds
    encodes, prefills, jobs = [], [], []

    def counting_encode(pixels, cancel=None):
        encodes.append(1)
        return encode(pixels, cancel)

    def counting_forward(h, *args, **kwargs):
        if h.shape[1] > 1:  # a prefill (a decode step, or a choice's one re-fed token, is one)
            prefills.append(h.shape[1])
        return forward_embeds(h, *args, **kwargs)

    monkeypatch.setattr(model, "encode_images", counting_encode)
    monkeypatch.setattr(lm, "forward_embeds", counting_forward)
    worker.on_start = jobs.append
    url = "data:image/png;base64," + base64.b64encode(png_bytes(textured_rgb(448, 448, seed=77))).decode()
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    try:
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], n=3,
                                             max_tokens=20, temperature=1.5, seed=3)  # fmt: skip
    finally:
        worker.on_start = None
    assert len(out.choices) == 3
    assert encodes == [1]  # one vision encoder call, for choice 0
    assert len(prefills) == 1  # one prefill pass (the prompt is under one chunk)
    done = records(worker, jobs[0].number)
    assert [r["choice"] for r in done] == [0, 1, 2] and len({r["slot"] for r in done}) == 1
    prompt = out.usage.prompt_tokens
    assert done[0]["prompt_n"] == prefills[0] == prompt - done[0]["cached_tokens"]
    assert [(r["prompt_n"], r["cached_tokens"]) for r in done[1:]] == [(1, prompt - 1)] * 2
    assert out.usage.prompt_tokens_details.cached_tokens == done[0]["cached_tokens"]  # what choice 0 found


def test_later_choices_keep_the_prompt_even_when_the_answers_outgrow_it(server, client):
    """Choosing a slot anew for each choice would drop the prompt's cache for the least recently
    used slot once an answer holds more than the prompt (the slot pool keeps a prefix only when it
    is at least half of what the slot holds)."""
    jobs = []
    server.worker.on_start = jobs.append
    try:
        out = ask(client, "Hi", n=3, max_tokens=400, temperature=1.5, seed=5)
    finally:
        server.worker.on_start = None
    done = records(server.worker, jobs[0].number)
    assert max(r["completion_tokens"] for r in done[:-1]) > out.usage.prompt_tokens, "an answer must outgrow the prompt"
    assert [r["prompt_n"] for r in done[1:]] == [1, 1]


# ---- stop strings and logprobs ----------------------------------------------------------------------


def test_a_stop_string_cuts_each_choice_and_ends_only_that_one(client):
    full = ask(client, max_tokens=24).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[: full.index(stop)]
    out = ask(client, max_tokens=24, stop=stop, n=3)
    assert [(c.message.content, c.finish_reason) for c in out.choices] == [(expected, "stop")] * 3
    chunks = list(ask(client, max_tokens=24, stop=stop, n=2, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == expected
        assert [c.finish_reason for c in mine if c.finish_reason] == ["stop"]


def test_with_logprobs_each_choice_lists_its_own_tokens(client):
    out = sampled(client, n=3, logprobs=True, top_logprobs=2)
    for c in out.choices:
        ids = c.model_extra["token_ids"]
        assert len(c.logprobs.content) == len(ids)
        assert all(len(entry.top_logprobs) == 2 for entry in c.logprobs.content)
    lists = [[e.token for e in c.logprobs.content] for c in out.choices]
    assert len({tuple(tokens) for tokens in lists}) == 3
    single = sampled(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [e.logprob for e in out.choices[0].logprobs.content] == [e.logprob for e in single]


# ---- streaming --------------------------------------------------------------------------------------


def test_a_stream_sends_each_choice_whole_in_order_with_its_index(client):
    whole = sampled(client, n=3)
    chunks = list(sampled(client, n=3, stream=True, stream_options={"include_usage": True}))
    assert all(c.id == chunks[0].id for c in chunks)
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2}  # choice 0 whole, then 1, then 2
    for index, want in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and [m.delta.role for m in mine[1:]] == [None] * (len(mine) - 1)
        assert "".join(m.delta.content or "" for m in mine) == want.message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == [want.finish_reason]
        assert mine[-1].finish_reason == want.finish_reason
        assert mine[-1].model_extra["token_ids"] == want.model_extra["token_ids"]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stream_with_logprobs_gives_each_choice_its_own(client):
    whole = sampled(client, n=2, logprobs=True)
    chunks = list(sampled(client, n=2, logprobs=True, stream=True))
    for index, want in enumerate(whole.choices):
        listed = [e for c in chunks if c.choices and c.choices[0].index == index and c.choices[0].logprobs
                  for e in c.choices[0].logprobs.content]  # fmt: skip
        assert [e.logprob for e in listed] == [e.logprob for e in want.logprobs.content]


def test_events_are_joined_only_within_one_choice():
    """The handler joins text events that queued up; text of the next choice must not be joined
    into the text before a choice's end."""
    batch = [("text", "a"), ("text", "b"), ("choice", {"index": 0}), ("text", "c"), ("choice", {"index": 1}),
             ("done", {})]  # fmt: skip

    class Events:
        async def get_batch(self, timeout):
            return batch

    class Request:
        async def is_disconnected(self):
            return False

    job = types.SimpleNamespace(events=Events(), cancel=threading.Event())

    async def first_six():
        out = []
        async for item in replies.job_events(job, Request()):
            out.append(item)
            if item[0] == "done":
                return out

    assert asyncio.run(first_six()) == [("text", ("ab", [])), ("choice", {"index": 0}), ("text", ("c", [])),
                                        ("choice", {"index": 1}), ("done", {})]  # fmt: skip


# ---- a client that leaves ---------------------------------------------------------------------------


def test_a_client_that_leaves_during_choice_1_stops_the_choices_left(server, client):
    worker = server.worker
    state = {"ended": 0, "texts": 0, "held": False}

    def watch(job, event):
        state["job"] = job
        if state["ended"] == 1 and state["texts"] and not state["held"]:
            # choice 1 has sent some text, which the client waits for: hold it until the client has left
            state["held"] = True
            assert job.cancel.wait(WAIT_S)
        if event["finish_reason"] is not None:
            state["ended"] += 1
        elif state["ended"] == 1 and event["text"]:
            state["texts"] += 1

    worker.on_event = watch
    try:
        stream = ask(client, "Write a long story.", n=3, max_tokens=200, temperature=1.5, seed=2, stream=True)
        for c in stream:
            if c.choices and c.choices[0].index == 1 and c.choices[0].delta.content:
                break
        stream.close()  # the client goes away during choice 1
        assert worker.wait_idle(WAIT_S)
    finally:
        worker.on_event = None
    assert state["held"]
    done = records(worker, state["job"].number)
    assert [r["choice"] for r in done] == [0, 1]  # choice 2 never began
    assert done[1]["finish_reason"] == "cancelled" and done[1]["completion_tokens"] < 200
