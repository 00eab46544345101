"""A scored /v1/completions prompt (echo with logprobs) keeps a slot's cached prefix whose scores
the slot kept (serve/slots.py's ScoredPrefix), as lm-evaluation-harness's multiple-choice tasks
send them: one long context, several continuations, each its own token-id prompt.

Every answer's prompt logprobs are checked against one full forward of the same tiny checkpoint
and against the same request rescored from its first token (the kept scores switched off), and
the tokens the scored prefill was fed are counted, to see the context scored once.
"""

from __future__ import annotations

import threading
from operator import itemgetter

import httpx
import pytest
import torch

from internvl_chat.engine import model as engine_model
from internvl_chat.serve.conversation import Prompt
from internvl_chat.serve.slots import Slot

WAIT_S = 120
CONTEXT = ("Question: which of these is a primary colour of light, as a physicist would list them "
           "for an additive display? Think of the pixels of a screen.\nAnswer:")  # fmt: skip
OTHER_CONTEXT = "The planets of the solar system, from the sun outwards, begin with Mercury, then"
CONTINUATIONS = [" red", " purple", " brown", " a shade of orange"]


@pytest.fixture(scope="module")
def server(tiny_original):
    from serve_support import RunningServer

    with RunningServer(tiny_original, max_context=1024, queue_depth=8, slots=2) as running:
        yield running


@pytest.fixture(scope="module")
def local(tiny_original):
    from internvl_chat.engine.loader import load_model

    return load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)


@pytest.fixture
def small_chunks(server, monkeypatch):
    """Prefill chunks of 16 tokens and score blocks of 5: a context ends inside a chunk and a block."""
    monkeypatch.setattr(server.worker.model, "prefill_chunk", 16)
    monkeypatch.setattr(engine_model, "SCORE_ROWS", 5)


@pytest.fixture
def fed(server, monkeypatch) -> list[tuple[int, int]]:
    """(start position, tokens) of each scored prefill, in order."""
    model, calls = server.worker.model, []
    real = model._scored_prefill

    def counting(ids, start_pos, *rest):
        calls.append((start_pos, len(ids)))
        return real(ids, start_pos, *rest)

    monkeypatch.setattr(model, "_scored_prefill", counting)
    return calls


@pytest.fixture
def fresh_slots(server):
    """Every slot forgets what it holds, so each test starts from empty caches."""
    server.worker.wait_idle(WAIT_S)
    for slot in server.worker.slots.slots:
        slot.session.ids, slot.session.start_pos, slot.spans, slot.scores = [], 0, [], None


def encode(local, text: str) -> list[int]:
    return local.tokenizer.encode(text)


def scored(server, prompts: list[list[int]], k: int = 1, n: int = 1, max_tokens: int = 1, **extra) -> list[dict]:
    """lm-eval's loglikelihood body (LocalCompletionsAPI): its choices in index order; `extra` adds fields."""
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": k,
            "seed": 1234, "echo": True, "n": n, **extra}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return sorted(response.json()["choices"], key=itemgetter("index"))


def prompt_part(choice: dict, ids: list[int]) -> tuple[list, list]:
    """The prompt's token_logprobs and top_logprobs (the answer's token after them left out)."""
    logprobs = choice["logprobs"]
    return logprobs["token_logprobs"][: len(ids)], logprobs["top_logprobs"][: len(ids)]


def rescored(server, ids: list[int], k: int, monkeypatch) -> tuple[list, list]:
    """The prompt's logprobs scored from its first token, no kept scores used."""
    with monkeypatch.context() as patch:
        patch.setattr(Slot, "scored_reuse", lambda self, prompt, k: 0)
        [choice] = scored(server, [ids], k)
    return prompt_part(choice, ids)


def assert_matches_a_full_forward(local, choice: dict, ids: list[int], k: int) -> None:
    values, tops = prompt_part(choice, ids)
    assert values[0] is None and tops[0] is None and len(values) == len(ids)
    with torch.inference_mode():
        reference = local.model.forward(ids, 0, all_logits=True).float().log_softmax(-1)
    for j in range(1, len(ids)):
        row = reference[j - 1]
        assert values[j] == pytest.approx(float(row[ids[j]]), abs=1e-4)
        assert 1 <= len(tops[j]) <= k + 1 and values[j] in tops[j].values()
        best = sorted(tops[j].values(), reverse=True)[0]
        assert best == pytest.approx(float(row.max()), abs=1e-4)


def assert_same_as_rescored(server, choice: dict, ids: list[int], k: int, monkeypatch) -> None:
    values, tops = prompt_part(choice, ids)
    again_values, again_tops = rescored(server, ids, k, monkeypatch)
    assert values[1:] == pytest.approx(again_values[1:], abs=1e-5)
    for top, again in zip(tops[1:], again_tops[1:]):
        assert top.keys() == again.keys() and list(top.values()) == pytest.approx(list(again.values()), abs=1e-5)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_the_continuations_of_one_context_score_it_once_and_match_a_full_forward(server, local, fed, monkeypatch):
    context = encode(local, CONTEXT)
    prompts = [context + encode(local, c) for c in CONTINUATIONS]
    assert len(context) % 16 and len(context) > 40  # the context ends inside a prefill chunk
    choices = scored(server, prompts)
    for choice, ids in zip(choices, prompts):
        assert_matches_a_full_forward(local, choice, ids, 1)
    # the first prompt is scored whole; each later one from the context's last token on (that
    # token's score comes from the position before it, kept; its own position is prefilled again)
    assert fed[0] == (0, len(prompts[0]))
    assert fed[1:] == [(len(context) - 1, len(ids) - len(context) + 1) for ids in prompts[1:]]
    cached = [r["cached_tokens"] for r in list(server.worker.finished)[-len(prompts) :]]
    assert cached == [0] + [len(context) - 1] * (len(prompts) - 1)
    for choice, ids in zip(choices[1:], prompts[1:]):
        assert_same_as_rescored(server, choice, ids, 1, monkeypatch)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_a_scored_context_is_kept_only_for_requests_with_its_cache_salt(server, local, fed):
    context = encode(local, CONTEXT)
    first, second, third = (context + encode(local, c) for c in CONTINUATIONS[:3])
    scored(server, [first], cache_salt="alice")
    [other] = scored(server, [second], cache_salt="mallory")  # another salt: scored whole, nothing of alice's kept
    assert fed[-1] == (0, len(second)) and server.worker.finished[-1]["cached_tokens"] == 0
    assert_matches_a_full_forward(local, other, second, 1)
    [own] = scored(server, [third], cache_salt="alice")  # alice's context is still kept, with its scores
    assert fed[-1] == (len(context) - 1, len(third) - len(context) + 1)
    assert_matches_a_full_forward(local, own, third, 1)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_more_alternatives_than_were_kept_rescore_the_prompt_and_fewer_are_cut_from_them(server, local, fed, monkeypatch):
    context = encode(local, CONTEXT)
    first, second, third = (context + encode(local, c) for c in CONTINUATIONS[:3])
    scored(server, [first], k=1)
    [wider] = scored(server, [second], k=3)  # k grew: the kept scores list too few alternatives
    assert fed[-1] == (0, len(second))
    assert_matches_a_full_forward(local, wider, second, 3)
    [narrower] = scored(server, [third], k=2)  # k 3 kept: cut to 2, only the new tokens scored
    assert fed[-1] == (len(context) - 1, len(third) - len(context) + 1)
    assert_matches_a_full_forward(local, narrower, third, 2)
    assert_same_as_rescored(server, narrower, third, 2, monkeypatch)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_an_unscored_write_in_between_drops_the_scores_past_where_it_began(server, local, fed, monkeypatch):
    worker = server.worker
    slot = worker.slots.slots[0]
    monkeypatch.setattr(worker.slots, "choose", lambda prompt: (slot, slot.reusable(prompt)))  # all on one slot
    context = encode(local, CONTEXT)
    first, second = (context + encode(local, c) for c in CONTINUATIONS[:2])
    scored(server, [first])
    # a plain completion of the context's first 20 tokens and other text: written from 20 on
    other = context[:20] + encode(local, " Never mind; tell me a story about a dragon instead.")
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": other, "max_tokens": 3,
                                                                "temperature": 0}, timeout=WAIT_S)  # fmt: skip
    assert response.status_code == 200
    assert len(slot.scores.rows) == 20 and slot.scores.ids == context[:21]  # token 20's score: its id is the context's
    [choice] = scored(server, [second])
    assert fed[-1][0] == 20  # the slot holds the context's first 20 tokens and their scores, no more
    assert_matches_a_full_forward(local, choice, second, 1)
    # a chat request on the same slot shares nothing with the context: no score is left
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=WAIT_S).status_code == 200
    assert worker.finished[-1]["slot"] == 0 and slot.scores is None
    [choice] = scored(server, [first])
    assert fed[-1] == (0, len(first))
    assert_matches_a_full_forward(local, choice, first, 1)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_n_choices_keep_the_prompts_scores_for_the_next_continuation(server, local, fed):
    context = encode(local, CONTEXT)
    first, second = (context + encode(local, c) for c in CONTINUATIONS[2:])
    choices = scored(server, [first], n=3, max_tokens=2)
    assert len(fed) == 1 and len({str(prompt_part(c, first)) for c in choices}) == 1
    for choice in choices:
        assert_matches_a_full_forward(local, choice, first, 1)
    [choice] = scored(server, [second])  # the later choices rewrote the prompt's last token only
    assert fed[-1] == (len(context) - 1, len(second) - len(context) + 1)
    assert_matches_a_full_forward(local, choice, second, 1)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_two_contexts_on_two_slots_each_keep_their_own_scores(server, local, fed, monkeypatch):
    contexts = [encode(local, CONTEXT), encode(local, OTHER_CONTEXT)]
    prompts = [[c + encode(local, x) for x in CONTINUATIONS[:2]] for c in contexts]
    scored(server, [prompts[0][0]])
    scored(server, [prompts[1][0]])  # shares nothing: the other slot, the first one's scores kept
    for number in (0, 1):
        [choice] = scored(server, [prompts[number][1]])
        assert fed[-1] == (len(contexts[number]) - 1, len(prompts[number][1]) - len(contexts[number]) + 1)
        assert_matches_a_full_forward(local, choice, prompts[number][1], 1)
    # sent at once from several clients: whichever order they run in, each is right
    results: dict[int, dict] = {}

    def send(number: int, ids: list[int]) -> None:
        [results[number]] = scored(server, [ids])

    everything = [ids for pair in prompts for ids in pair]
    threads = [threading.Thread(target=send, args=(i, ids)) for i, ids in enumerate(everything)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    for number, ids in enumerate(everything):
        assert_matches_a_full_forward(local, results[number], ids, 1)
        assert_same_as_rescored(server, results[number], ids, 1, monkeypatch)


@pytest.mark.usefixtures("small_chunks", "fresh_slots")
def test_a_scored_prompt_goes_to_the_slot_that_kept_its_scores_not_one_that_only_cached_it(server, local, fed):
    worker = server.worker
    context = encode(local, CONTEXT)
    tail = encode(local, " Never mind; tell me a story about a dragon instead." * 6)
    assert len(tail) > len(context)  # the context is less than half of what the plain request leaves cached
    plain = {"model": "tiny", "prompt": context + tail, "max_tokens": 1, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=plain, timeout=WAIT_S).status_code == 200
    assert worker.finished[-1]["slot"] == 0  # its tokens cached, no scores
    first, second = (context + encode(local, c) for c in CONTINUATIONS[:2])
    scored(server, [first])  # slot 0 keeps less than half of what it holds: the empty slot, scored whole
    assert worker.finished[-1]["slot"] == 1 and fed[-1] == (0, len(first))
    # both slots cache the context, and slot 0 is the least recently used: by cached tokens alone it
    # would be chosen, and score the prompt from its first token; slot 1 alone kept the scores
    assert [slot.reusable(Prompt(second)) for slot in worker.slots.slots] == [len(context)] * 2
    [choice] = scored(server, [second])
    assert fed[-1] == (len(context) - 1, len(second) - len(context) + 1)  # the context not scored again
    assert worker.finished[-1]["slot"] == 1
    assert worker.finished[-1]["cached_tokens"] == len(context) - 1
    assert_matches_a_full_forward(local, choice, second, 1)
